package personalize.decode;

import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.util.HexFormat;

import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.ScalarFunction;
import org.apache.flink.types.Row;

/**
 * {@code decode_event(value BYTES) -> ROW<...>}: the job's decode step as a SQL scalar
 * function (registered by jobs/profile.py). The row's fields are
 * operators/decode.py's DECODED_COLUMNS, names and types alike.
 *
 * <p>Built with a pseudonym key (PERSONALIZE_PSEUDONYM_KEY, handed over by jobs/profile.py
 * as a constructor argument, so it travels inside the job like the connectors' passwords
 * and appears in no plan, operator name or log), every user id it returns is the keyed
 * HMAC-SHA256 of the id, its first 16 bytes in hex (operators/decode.py: pseudonym).
 */
public class DecodeEvent extends ScalarFunction {
    public static final String RESULT = "ROW<user_id STRING, event_type STRING, product_id STRING, "
            + "category STRING, price_cents BIGINT, quantity BIGINT, consent_analytics BOOLEAN, "
            + "consent_personalization BOOLEAN, consent_marketing BOOLEAN, event_time_ms BIGINT, reason STRING>";

    /** Hex characters of a pseudonym: 128 bits of the HMAC. */
    public static final int PSEUDONYM_BYTES = 16;

    private final String pseudonymKey;
    private transient EventDecoder decoder;
    private transient Mac mac;

    public DecodeEvent() {
        this("");
    }

    public DecodeEvent(String pseudonymKey) {
        this.pseudonymKey = pseudonymKey == null ? "" : pseudonymKey;
    }

    @Override
    public void open(FunctionContext context) {
        start();
    }

    private void start() {
        decoder = new EventDecoder();
        if (!pseudonymKey.isEmpty()) {
            try {
                mac = Mac.getInstance("HmacSHA256");
                mac.init(new SecretKeySpec(pseudonymKey.getBytes(StandardCharsets.UTF_8), "HmacSHA256"));
            } catch (GeneralSecurityException e) {
                throw new IllegalStateException("HmacSHA256 is not available in this JVM", e);
            }
        }
    }

    public @DataTypeHint(RESULT) Row eval(byte[] value) {
        return Row.of(fields(value));
    }

    /** The decoded fields (EventDecoder.decode), the user id pseudonymised when there is a key. */
    Object[] fields(byte[] value) {
        if (decoder == null) {
            start();
        }
        Object[] fields = decoder.decode(value);
        if (mac != null && fields[0] != null) {
            fields[0] = pseudonym((String) fields[0]);
        }
        return fields;
    }

    /** The user id's pseudonym under this function's key. */
    String pseudonym(String userId) {
        byte[] digest = mac.doFinal(userId.getBytes(StandardCharsets.UTF_8));
        return HexFormat.of().formatHex(digest, 0, PSEUDONYM_BYTES);
    }

    @Override
    public String toString() {
        return "DecodeEvent" + (pseudonymKey.isEmpty() ? "" : "(pseudonymised)");
    }

    @Override
    public boolean isDeterministic() {
        return true;
    }
}
