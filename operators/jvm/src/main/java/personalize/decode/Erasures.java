package personalize.decode;

import java.io.IOException;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.flink.kafka.shaded.org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.flink.kafka.shaded.org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.flink.kafka.shaded.org.apache.kafka.common.PartitionInfo;
import org.apache.flink.kafka.shaded.org.apache.kafka.common.TopicPartition;
import org.apache.flink.kafka.shaded.org.apache.kafka.common.serialization.ByteArrayDeserializer;

/**
 * The erasure requests ({@code personalize forget}) a TaskManager's functions honour: user id
 * -> the newest {@code requested_ms}, read from the compacted erasures topic (Avro Erasure,
 * single-object encoded) by one consumer thread per topic and JVM, shared by every function
 * instance of the job there (the decode and the output filters).
 *
 * <p>{@link #open} returns once the registry has read the topic to the end offsets it found
 * (so a bounded run knows every erasure made before it started); the thread then follows
 * the topic. Erasures only ever grow (a later request for the same user moves its time on),
 * so the registry is a side input that is never wrong, only late by up to one poll
 * ({@link #POLL}); {@link Registry#await} waits that out where order matters. It is not
 * Flink state: a restore reads the topic again.
 *
 * <p>The consumer is the Kafka client Flink's SQL connector jar carries (shaded), with the
 * job's connection and credential properties, so this jar adds no Kafka client of its own.
 */
public final class Erasures {
    public static final String SCHEMA = "erasure";
    public static final Duration POLL = Duration.ofMillis(100);
    static final int HEADER_LEN = 10;

    private static final Map<String, Registry> OPEN = new HashMap<>();

    private Erasures() {}

    /** The registry of this topic and these properties, read to the current end; closed by {@link #release}. */
    public static Registry open(String topic, Map<String, String> properties) {
        String key = topic + "\n" + new java.util.TreeMap<>(properties);
        Registry registry;
        synchronized (OPEN) {
            registry = OPEN.get(key);
            if (registry == null) {
                registry = new Registry(key, topic, properties);
                OPEN.put(key, registry);
                registry.start();
            }
            registry.users++;
        }
        registry.awaitStart();
        return registry;
    }

    public static void release(Registry registry) {
        synchronized (OPEN) {
            if (--registry.users == 0) {
                OPEN.remove(registry.key);
                registry.stop();
            }
        }
    }

    /** The fingerprint (CRC-64-AVRO of the parsing canonical form) of schemas/erasure.avsc. */
    static long fingerprint() {
        try (InputStream in = Erasures.class.getResourceAsStream("/schemas/" + SCHEMA + ".avsc")) {
            if (in == null) {
                throw new IllegalStateException("schemas/erasure.avsc is not in the decode jar: rebuild it (make setup)");
            }
            return SchemaNormalization.parsingFingerprint64(new Schema.Parser().parse(in));
        } catch (IOException e) {
            throw new IllegalStateException("cannot read schemas/erasure.avsc from the decode jar", e);
        }
    }

    /** (user_id, requested_ms) of an Erasure record, or null when the bytes are not one. */
    static Object[] decode(byte[] value, long fingerprint) {
        if (value == null || value.length < HEADER_LEN + 2 || value[0] != (byte) 0xC3 || value[1] != 0x01
                || ByteBuffer.wrap(value, 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong() != fingerprint) {
            return null;
        }
        try {
            BinaryDecoder in = DecoderFactory.get().binaryDecoder(value, HEADER_LEN, value.length - HEADER_LEN, null);
            String user = in.readString();
            long requested = in.readLong();
            return new Object[] {user, requested};
        } catch (IOException | RuntimeException e) {
            return null;
        }
    }

    /** One topic's erasures in this JVM. */
    public static final class Registry implements Runnable {
        private final String key;
        private final String topic;
        private final Map<String, String> properties;
        private final long fingerprint = fingerprint();
        private final ConcurrentHashMap<String, Long> erased = new ConcurrentHashMap<>();
        private final CountDownLatch started = new CountDownLatch(1);
        private volatile boolean running = true;
        private volatile RuntimeException failed;
        private Thread thread;
        private int users;

        Registry(String key, String topic, Map<String, String> properties) {
            this.key = key;
            this.topic = topic;
            this.properties = properties;
        }

        /** The newest erasure time of the user, or null. */
        public Long erasedAt(String user) {
            return erased.get(user);
        }

        public int size() {
            return erased.size();
        }

        /** Waits (up to timeoutMs) until this registry holds an erasure of the user at or after requestedMs. */
        public boolean await(String user, long requestedMs, long timeoutMs) throws InterruptedException {
            long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(timeoutMs);
            while (true) {
                Long at = erased.get(user);
                if (at != null && at >= requestedMs) {
                    return true;
                }
                if (System.nanoTime() > deadline || !running) {
                    return false;
                }
                Thread.sleep(POLL.toMillis() / 2);
            }
        }

        private void start() {
            thread = new Thread(this, "personalize-erasures-" + topic);
            thread.setDaemon(true);
            thread.setContextClassLoader(Erasures.class.getClassLoader());
            thread.start();
        }

        private void awaitStart() {
            try {
                if (!started.await(120, TimeUnit.SECONDS)) {
                    throw new IllegalStateException("the erasures topic '" + topic + "' was not read to its end in 120 s");
                }
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new IllegalStateException("interrupted while reading the erasures topic", e);
            }
            if (failed != null) {
                throw failed;
            }
        }

        private void stop() {
            running = false;
        }

        @Override
        public void run() {
            Properties props = new Properties();
            props.putAll(properties);
            props.put("enable.auto.commit", "false");
            props.put("isolation.level", "read_committed");
            props.put("client.id", "personalize-erasures");
            try (KafkaConsumer<byte[], byte[]> consumer =
                         new KafkaConsumer<>(props, new ByteArrayDeserializer(), new ByteArrayDeserializer())) {
                List<TopicPartition> partitions = new ArrayList<>();
                List<PartitionInfo> infos = consumer.partitionsFor(topic, Duration.ofSeconds(60));
                for (PartitionInfo info : infos == null ? List.<PartitionInfo>of() : infos) {
                    partitions.add(new TopicPartition(topic, info.partition()));
                }
                consumer.assign(partitions);
                consumer.seekToBeginning(partitions);
                Map<TopicPartition, Long> ends = consumer.endOffsets(partitions, Duration.ofSeconds(60));
                boolean caughtUp = false;
                while (running) {
                    for (ConsumerRecord<byte[], byte[]> record : consumer.poll(POLL)) {
                        Object[] erasure = decode(record.value(), fingerprint);
                        if (erasure != null) {
                            erased.merge((String) erasure[0], (Long) erasure[1], Math::max);
                        }
                    }
                    if (!caughtUp) {
                        caughtUp = true;
                        for (TopicPartition tp : partitions) {
                            caughtUp &= consumer.position(tp) >= ends.get(tp);
                        }
                        if (caughtUp) {
                            started.countDown();
                        }
                    }
                    if (partitions.isEmpty()) {  // no topic yet: nothing to follow
                        started.countDown();
                        Thread.sleep(1_000);
                    }
                }
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            } catch (RuntimeException e) {
                failed = new IllegalStateException("reading the erasures topic '" + topic + "' failed: " + e, e);
                running = false;
            } finally {
                started.countDown();
            }
        }
    }
}
