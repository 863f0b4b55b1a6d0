package personalize.decode;

import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.ScalarFunction;
import org.apache.flink.types.Row;

/**
 * {@code decode_event(value BYTES) -> ROW<...>}: the job's decode step as a SQL scalar
 * function (registered by jobs/profile.py). The row's fields are
 * operators/decode.py's DECODED_COLUMNS, names and types alike.
 */
public class DecodeEvent extends ScalarFunction {
    public static final String RESULT = "ROW<user_id STRING, event_type STRING, product_id STRING, "
            + "category STRING, price_cents BIGINT, quantity BIGINT, consent_analytics BOOLEAN, "
            + "consent_personalization BOOLEAN, consent_marketing BOOLEAN, event_time_ms BIGINT, reason STRING>";

    private transient EventDecoder decoder;

    @Override
    public void open(FunctionContext context) {
        decoder = new EventDecoder();
    }

    public @DataTypeHint(RESULT) Row eval(byte[] value) {
        if (decoder == null) {
            decoder = new EventDecoder();
        }
        return Row.of(decoder.decode(value));
    }

    @Override
    public boolean isDeterministic() {
        return true;
    }
}
