package personalize.profile;

import java.util.List;
import java.util.Map;

import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.table.api.Table;
import org.apache.flink.table.api.bridge.java.StreamTableEnvironment;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.runtime.typeutils.InternalTypeInfo;
import org.apache.flink.table.types.logical.RowType;
import org.apache.flink.table.types.logical.utils.LogicalTypeParser;

/**
 * The job's live state step between its SQL and the DataStream API (called by
 * jobs/profile.py): the events view's internal rows, keyed by user id in the JVM, through
 * {@link LiveStateFunction}, and its changes back as a table (user_id, then the columns of
 * {@link LiveStateFunction#OUTPUT}). Rows cross as Flink's internal rows both ways: no conversion
 * to external rows and back.
 */
public final class LiveState {
    /** the changes' columns: the user id, then the function's */
    public static final String CHANGES = "ROW<user_id STRING, " + LiveStateFunction.OUTPUT.substring("ROW<".length());

    private LiveState() {
    }

    /** The user id of an event row, as the key. */
    static final class UserKey implements KeySelector<RowData, String> {
        private static final long serialVersionUID = 1L;
        private final int field;

        UserKey(int field) {
            this.field = field;
        }

        @Override
        public String getKey(RowData row) {
            return row.getString(field).toString();
        }
    }

    /**
     * The changes of every user's live state over {@code events} (a table with the events
     * view's columns and a rowtime attribute), by the operator {@code uid} named {@code name},
     * with the settings: session gap, recent window and slide, list limit, state TTL (0: none),
     * whether the run is bounded, the models' snapshot topic and its Kafka properties.
     */
    public static Table changes(StreamTableEnvironment tEnv, Table events, String uid, String name, String gapMs,
                                String recentWindowMs, String recentSlideMs, String listLimit, String stateTtlMs,
                                String bounded, String snapshotsTopic, Map<String, String> kafka) {
        List<String> columns = events.getResolvedSchema().getColumnNames();
        LiveStateFunction.Fields in = new LiveStateFunction.Fields(
                index(columns, "user_id"), index(columns, "event_type"), index(columns, "product_id"),
                index(columns, "category"), index(columns, "price_cents"), index(columns, "quantity"),
                index(columns, "consent_personalization"), index(columns, "consent_marketing"),
                index(columns, "event_time_ms"), index(columns, "epoch"));
        LiveStateFunction function = new LiveStateFunction(in, Long.parseLong(gapMs), Long.parseLong(recentWindowMs),
                Long.parseLong(recentSlideMs), Integer.parseInt(listLimit), Long.parseLong(stateTtlMs),
                Boolean.parseBoolean(bounded), snapshotsTopic, kafka);
        DataStream<RowData> rows = tEnv.toDataStream(
                events, events.getResolvedSchema().toPhysicalRowDataType().bridgedTo(RowData.class));
        RowType out = (RowType) LogicalTypeParser.parse(CHANGES, LiveState.class.getClassLoader());
        DataStream<RowData> changes = rows
                .keyBy(new UserKey(in.userId()))
                .process(function, InternalTypeInfo.of(out))
                .uid(uid)
                .name(name);
        return tEnv.fromDataStream(changes);
    }

    private static int index(List<String> columns, String name) {
        int i = columns.indexOf(name);
        if (i < 0) {
            throw new IllegalArgumentException("the live state's input has no column " + name + ": " + columns);
        }
        return i;
    }
}
