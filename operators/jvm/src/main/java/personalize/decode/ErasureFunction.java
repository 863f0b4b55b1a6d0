package personalize.decode;

import java.util.Map;

import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.ScalarFunction;
import org.apache.flink.types.Row;

/**
 * The SQL functions of the erasure path besides the decode (registered by jobs/profile.py),
 * each over this JVM's {@link Erasures.Registry} of the erasures topic:
 *
 * <ul>
 *   <li>{@link Superseded} {@code erased_since(user_id, epoch) -> BOOLEAN}: true when the
 *       user was forgotten after the state this row comes from began (its epoch): the
 *       row holds data of before the erasure and is not written;
 *   <li>{@link Applied} {@code erasure_applied(user_id, requested_ms) -> BOOLEAN}: waits
 *       until this JVM's registry holds the erasure (at most {@link #WAIT_MS}), so the
 *       tombstones that follow it come after the last row the filters let through;
 *   <li>{@link Decode} {@code decode_erasure(value) -> ROW<user_id, requested_ms>}: an Erasure
 *       record of the topic (NULL fields when the bytes are not one).
 * </ul>
 */
public abstract class ErasureFunction extends ScalarFunction {
    public static final long WAIT_MS = 60_000L;

    private final String topic;
    private final Map<String, String> kafka;
    protected transient Erasures.Registry erasures;

    protected ErasureFunction(String topic, Map<String, String> kafka) {
        this.topic = topic;
        this.kafka = Map.copyOf(kafka);
    }

    @Override
    public void open(FunctionContext context) {
        erasures = Erasures.open(topic, kafka);
    }

    @Override
    public void close() {
        if (erasures != null) {
            Erasures.release(erasures);
            erasures = null;
        }
    }

    @Override
    public boolean isDeterministic() {
        return false; // the registry grows while the job runs
    }

    public static final class Superseded extends ErasureFunction {
        public Superseded(String topic, Map<String, String> kafka) {
            super(topic, kafka);
        }

        public Boolean eval(String userId, Long epoch) {
            if (userId == null) {
                return false;
            }
            Long erasedAt = erasures.erasedAt(userId);
            return erasedAt != null && erasedAt > (epoch == null ? 0L : epoch);
        }
    }

    public static final class Applied extends ErasureFunction {
        public Applied(String topic, Map<String, String> kafka) {
            super(topic, kafka);
        }

        public Boolean eval(String userId, Long requestedMs) {
            if (userId != null && requestedMs != null) {
                try {
                    erasures.await(userId, requestedMs, WAIT_MS);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
            }
            return true;
        }
    }

    /** Needs no registry: it reads the erasure records themselves. */
    public static final class Decode extends ScalarFunction {
        private transient long fingerprint;

        @Override
        public void open(FunctionContext context) {
            fingerprint = Erasures.fingerprint();
        }

        public @DataTypeHint("ROW<user_id STRING, requested_ms BIGINT>") Row eval(byte[] value) {
            Object[] erasure = Erasures.decode(value, fingerprint);
            return erasure == null ? Row.of(null, null) : Row.of(erasure);
        }
    }
}
