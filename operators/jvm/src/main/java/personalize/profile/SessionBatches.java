package personalize.profile;

import java.util.ArrayList;
import java.util.List;

import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ListState;
import org.apache.flink.api.common.state.ListStateDescriptor;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.BasicArrayTypeInfo;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.common.typeutils.base.IntSerializer;
import org.apache.flink.api.common.typeutils.base.StringSerializer;
import org.apache.flink.api.java.typeutils.RowTypeInfo;
import org.apache.flink.streaming.api.datastream.KeyedStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;

/**
 * The models step's input in batches: the packed closed-session rows (and erasure rows) of
 * the job, keyed by a constant, gathered in keyed list state and handed on as one row of
 * {@code (0, String[])} per {@code batch} rows, {@code flushMs} after the first row of a
 * batch, or at the end of input, in the order they came.
 *
 * <p>The models step runs in Python, where each row that crosses costs the conversion and
 * the Python operator's own calls, and where a row kept until its batch fills cost a state
 * call more: about a fifth of the step's time per closed session. A batch crosses once, and
 * the step runs it through the models in the same call (so a checkpoint holds a batch either
 * here or in the models' state, never half of it).
 */
public final class SessionBatches extends KeyedProcessFunction<Row, Row, Row> {
    private static final long serialVersionUID = 1L;
    /** the output: the constant key, then the batch */
    public static final TypeInformation<Row> OUTPUT =
            new RowTypeInfo(Types.INT, BasicArrayTypeInfo.STRING_ARRAY_TYPE_INFO);

    private final int batch;
    private final long flushMs;
    private transient ListState<String> rows;
    private transient ValueState<Integer> size;

    public SessionBatches(int batch, long flushMs) {
        if (batch < 1 || flushMs < 1) {
            throw new IllegalArgumentException("a models batch needs at least one row and 1 ms, got " + batch
                    + " rows, " + flushMs + " ms");
        }
        this.batch = batch;
        this.flushMs = flushMs;
    }

    /**
     * The rows of {@code keyed} (keyed by PyFlink's KeyByKeySelector on a constant) in batches,
     * as an operator of the given uid and name; the batch size and flush time as the job's
     * settings give them (strings: the Python job passes them through the gateway).
     */
    public static SingleOutputStreamOperator<Row> batched(KeyedStream<Row, Row> keyed, String uid, String name,
                                                          String batch, String flushMs) {
        return keyed.process(new SessionBatches(Integer.parseInt(batch), Long.parseLong(flushMs)), OUTPUT)
                .uid(uid)
                .name(name);
    }

    @Override
    public void open(OpenContext context) {
        rows = getRuntimeContext().getListState(new ListStateDescriptor<>("rows", StringSerializer.INSTANCE));
        size = getRuntimeContext().getState(new ValueStateDescriptor<>("size", IntSerializer.INSTANCE));
    }

    @Override
    public void processElement(Row row, Context ctx, Collector<Row> out) throws Exception {
        rows.add((String) row.getField(1));
        Integer held = size.value();
        int n = held == null ? 1 : held + 1;
        if (n == 1) {
            ctx.timerService().registerProcessingTimeTimer(ctx.timerService().currentProcessingTime() + flushMs);
            ctx.timerService().registerEventTimeTimer(Long.MAX_VALUE); // the end of input
        }
        if (n >= batch) {
            emit(out);
        } else {
            size.update(n);
        }
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<Row> out) throws Exception {
        if (size.value() != null) {
            emit(out);
        }
    }

    private void emit(Collector<Row> out) throws Exception {
        List<String> held = new ArrayList<>();
        for (String row : rows.get()) {
            held.add(row);
        }
        rows.clear();
        size.clear();
        out.collect(Row.of(0, held.toArray(new String[0])));
    }
}
