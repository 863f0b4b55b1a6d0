package personalize.profile;

import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.flink.kafka.shaded.org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.flink.kafka.shaded.org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.flink.kafka.shaded.org.apache.kafka.common.PartitionInfo;
import org.apache.flink.kafka.shaded.org.apache.kafka.common.TopicPartition;
import org.apache.flink.kafka.shaded.org.apache.kafka.common.serialization.ByteArrayDeserializer;

/**
 * The newest propensity model the models' Python step published, for scoring the session in
 * progress in the JVM ({@link LiveStateFunction}): its frozen scaler (mean, scale per feature), its
 * weights and intercept, in {@code operators/models.py}'s PROPENSITY_FEATURES order. The models
 * step writes a snapshot per flush to the model-snapshots topic (exactly-once, one partition);
 * one consumer thread per topic and JVM follows it (read_committed) and keeps the newest model,
 * shared by every function instance there, as the erasures registry does. Not Flink state: a
 * restore reads the topic again, and until a model arrives the session in progress has no score.
 */
public final class PropensityModel {
    public static final Duration POLL = Duration.ofMillis(200);
    private static final ObjectMapper JSON = new ObjectMapper();
    private static final Map<String, Registry> OPEN = new HashMap<>();

    final double[] mean;
    final double[] scale;
    final double[] weights;
    final double intercept;

    PropensityModel(double[] mean, double[] scale, double[] weights, double intercept) {
        this.mean = mean;
        this.scale = scale;
        this.weights = weights;
        this.intercept = intercept;
    }

    /** P(purchase) of raw features (UserState features order), as River's LogisticRegression gives it. */
    public double score(double[] features) {
        double z = intercept;
        for (int i = 0; i < weights.length && i < features.length; i++) {
            z += weights[i] * ((features[i] - mean[i]) / scale[i]);
        }
        return 1.0 / (1.0 + Math.exp(-z));
    }

    /** The model in a snapshot's JSON ({@code propensity_model}), or null when it has none. */
    static PropensityModel parse(byte[] snapshot) {
        if (snapshot == null) {
            return null;
        }
        try {
            JsonNode m = JSON.readTree(snapshot).get("propensity_model");
            if (m == null || m.isNull()) {
                return null;
            }
            double[] mean = doubles(m.get("mean")), scale = doubles(m.get("scale")), weights = doubles(m.get("weights"));
            if (mean.length != Features.COUNT || scale.length != Features.COUNT || weights.length != Features.COUNT) {
                return null; // another feature list than this release computes: no score rather than a wrong one
            }
            return new PropensityModel(mean, scale, weights, m.get("intercept").asDouble());
        } catch (java.io.IOException | RuntimeException e) {
            return null;
        }
    }

    private static double[] doubles(JsonNode array) {
        if (array == null || !array.isArray()) {
            return new double[0];
        }
        double[] out = new double[array.size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = array.get(i).asDouble();
        }
        return out;
    }

    /** The registry of this topic and these properties; closed by {@link #release}. */
    public static Registry open(String topic, Map<String, String> properties) {
        String key = topic + "\n" + new java.util.TreeMap<>(properties);
        synchronized (OPEN) {
            Registry registry = OPEN.get(key);
            if (registry == null) {
                registry = new Registry(key, topic, properties);
                OPEN.put(key, registry);
                registry.start();
            }
            registry.users++;
            return registry;
        }
    }

    public static void release(Registry registry) {
        synchronized (OPEN) {
            if (--registry.users == 0) {
                OPEN.remove(registry.key);
                registry.running = false;
            }
        }
    }

    /** One topic's newest model in this JVM. */
    public static final class Registry implements Runnable {
        private final String key;
        private final String topic;
        private final Map<String, String> properties;
        private volatile PropensityModel newest;
        private volatile boolean running = true;
        private int users;

        Registry(String key, String topic, Map<String, String> properties) {
            this.key = key;
            this.topic = topic;
            this.properties = properties;
        }

        /** The newest model read, or null before the first. */
        public PropensityModel model() {
            return newest;
        }

        private void start() {
            Thread thread = new Thread(this, "personalize-propensity-" + topic);
            thread.setDaemon(true);
            thread.setContextClassLoader(PropensityModel.class.getClassLoader());
            thread.start();
        }

        @Override
        public void run() {
            Properties props = new Properties();
            props.putAll(properties);
            props.put("enable.auto.commit", "false");
            props.put("isolation.level", "read_committed");
            props.put("client.id", "personalize-propensity");
            while (running) { // a topic not there yet, or a broker away: try again
                try (KafkaConsumer<byte[], byte[]> consumer =
                             new KafkaConsumer<>(props, new ByteArrayDeserializer(), new ByteArrayDeserializer())) {
                    List<TopicPartition> partitions = new ArrayList<>();
                    List<PartitionInfo> infos = consumer.partitionsFor(topic, Duration.ofSeconds(60));
                    for (PartitionInfo info : infos == null ? List.<PartitionInfo>of() : infos) {
                        partitions.add(new TopicPartition(topic, info.partition()));
                    }
                    if (partitions.isEmpty()) {
                        Thread.sleep(1_000);
                        continue;
                    }
                    consumer.assign(partitions);
                    consumer.seekToBeginning(partitions);
                    while (running) {
                        for (ConsumerRecord<byte[], byte[]> record : consumer.poll(POLL)) {
                            PropensityModel model = parse(record.value());
                            if (model != null) {
                                newest = model; // one partition: records in the order written
                            }
                        }
                    }
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                    return;
                } catch (RuntimeException e) {
                    try {
                        Thread.sleep(1_000);
                    } catch (InterruptedException stop) {
                        Thread.currentThread().interrupt();
                        return;
                    }
                }
            }
        }
    }
}
