package personalize.decode;

import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.util.HexFormat;
import java.util.Map;

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
 *
 * <p>Built with an erasures topic (and the job's Kafka properties), it honours
 * {@code personalize forget}: an event of a forgotten user at or before the erasure's time
 * gets the reason {@link #ERASED} (the job drops it: it is the user's data, so not a dead
 * letter either, and a replay of the events topic does not bring the user back), and every
 * later one carries that time as its {@code epoch}. The windows group by (user, epoch), so
 * a forgotten user's next event starts from nothing, while the state of before is never
 * read again and expires (PERSONALIZE_STATE_TTL_MS). Without erasures, {@code epoch} is 0.
 */
public class DecodeEvent extends ScalarFunction {
    public static final String RESULT = "ROW<user_id STRING, event_type STRING, product_id STRING, "
            + "category STRING, price_cents BIGINT, quantity BIGINT, consent_analytics BOOLEAN, "
            + "consent_personalization BOOLEAN, consent_marketing BOOLEAN, event_time_ms BIGINT, reason STRING, "
            + "epoch BIGINT>";

    /** The reason of an event its user asked to be forgotten for ({@code personalize forget}): dropped, not a dead letter. */
    public static final String ERASED = "erased";
    static final int USER = 0;
    static final int EVENT_TIME = 9;
    static final int REASON = 10;

    /** Hex characters of a pseudonym: 128 bits of the HMAC. */
    public static final int PSEUDONYM_BYTES = 16;

    private final String pseudonymKey;
    private final String erasureTopic;
    private final Map<String, String> kafka;
    private transient EventDecoder decoder;
    private transient Mac mac;
    private transient Erasures.Registry erasures;

    public DecodeEvent() {
        this("");
    }

    public DecodeEvent(String pseudonymKey) {
        this(pseudonymKey, "", Map.of());
    }

    /** {@code kafka}: the consumer properties of the erasures topic (bootstrap servers, credentials). */
    public DecodeEvent(String pseudonymKey, String erasureTopic, Map<String, String> kafka) {
        this.pseudonymKey = pseudonymKey == null ? "" : pseudonymKey;
        this.erasureTopic = erasureTopic == null ? "" : erasureTopic;
        this.kafka = Map.copyOf(kafka);
    }

    @Override
    public void open(FunctionContext context) {
        start();
        if (!erasureTopic.isEmpty()) {
            erasures = Erasures.open(erasureTopic, kafka);
        }
    }

    @Override
    public void close() {
        if (erasures != null) {
            Erasures.release(erasures);
            erasures = null;
        }
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
        Object[] fields = fields(value);
        Object[] row = java.util.Arrays.copyOf(fields, fields.length + 1);
        long epoch = 0L;
        if (erasures != null && fields[REASON] == null) {
            Long erasedAt = erasures.erasedAt((String) fields[USER]);
            if (erasedAt != null) {
                if ((Long) fields[EVENT_TIME] <= erasedAt) {
                    row[REASON] = ERASED;
                } else {
                    epoch = erasedAt;
                }
            }
        }
        row[fields.length] = epoch;
        return Row.of(row);
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
        return "DecodeEvent" + (pseudonymKey.isEmpty() ? "" : "(pseudonymised)")
                + (erasureTopic.isEmpty() ? "" : "(erasures: " + erasureTopic + ")");
    }

    @Override
    public boolean isDeterministic() {
        return true;
    }
}
