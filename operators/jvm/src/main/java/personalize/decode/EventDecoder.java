package personalize.decode;

import java.io.IOException;
import java.io.InputStream;
import java.math.BigDecimal;
import java.math.MathContext;
import java.math.RoundingMode;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CharsetDecoder;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.Map;

import org.apache.avro.AvroRuntimeException;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.Decoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.util.Utf8;

/**
 * One Kafka record's bytes -> the event's fields, or the reason it cannot be used.
 *
 * <p>The JVM twin of {@code operators/decode.py: decode_row} (the Python codec and
 * {@code validate}): the same Avro single-object encoding (marker C3 01, the writer
 * schema's CRC-64-AVRO fingerprint, the binary datum), the same schema versions
 * (the project's {@code schemas/} packed into this jar, older versions resolved to
 * the current one by Avro's resolving reader), the same checks in the same order
 * and the same reasons. Both are held to one shared corpus
 * ({@code tests/unit/operators/test_decode_jvm.py}). Where the two Avro libraries
 * read invalid data differently, this side reads it as fastavro does: a boolean byte
 * other than 0 is true, an int is read as a varint long and refused when it does
 * not fit; strings must be valid UTF-8 (fastavro decodes strictly; Avro's Java
 * library would replace bad bytes).
 *
 * <p>Not thread-safe: one instance per function instance (Flink calls it from one thread).
 */
public final class EventDecoder {
    public static final String NAME = "user_event";
    static final int HEADER_LEN = 10;
    static final int MAX_ID_CHARS = 256;
    static final long MAX_PRICE_CENTS = 100_000_000L; // 1,000,000.00
    static final long MAX_QUANTITY = 1_000L;
    static final long MAX_EVENT_MS = 253_402_300_799_999L; // 9999-12-31T23:59:59.999Z, the last SQL TIMESTAMP(3)
    /** Prices at or beyond this size are refused before any rounding (far above the maximum). */
    static final double PRICE_LIMIT = 1e13;
    static final String[] ID_FIELDS = {"user_id", "product_id", "category", "session_id", "event_id"};
    /** Number of values {@link #decode} returns: the event's ten fields and the reason. */
    public static final int WIDTH = 11;

    private final Map<Long, GenericDatumReader<GenericRecord>> readers = new HashMap<>();
    private final GenericDatumReader<GenericRecord> current;
    private final FastavroDecoder in = new FastavroDecoder();
    private BinaryDecoder binary;
    private GenericRecord reuse;

    public EventDecoder() {
        Schema schema = parse("schemas/" + NAME + ".avsc");
        current = new GenericDatumReader<>(schema);
        readers.put(SchemaNormalization.parsingFingerprint64(schema), current);
        for (int version = 1; ; version++) {
            String path = "schemas/versions/" + NAME + ".v" + version + ".avsc";
            if (EventDecoder.class.getClassLoader().getResource(path) == null) {
                break;
            }
            Schema old = parse(path);
            readers.putIfAbsent(SchemaNormalization.parsingFingerprint64(old), new GenericDatumReader<>(old, schema));
        }
    }

    private static Schema parse(String resource) {
        try (InputStream stream = EventDecoder.class.getClassLoader().getResourceAsStream(resource)) {
            if (stream == null) {
                throw new IllegalStateException("schema " + resource + " is not in the jar");
            }
            return new Schema.Parser().parse(stream);
        } catch (IOException e) {
            throw new IllegalStateException("cannot read schema " + resource, e);
        }
    }

    /** The fields of decode.DECODED_COLUMNS: user_id, event_type, product_id, category,
     * price_cents, quantity, consent_analytics, consent_personalization, consent_marketing,
     * event_time_ms, reason. */
    public Object[] decode(byte[] value) {
        Object[] out = new Object[WIDTH];
        GenericRecord event;
        try {
            event = read(value);
        } catch (Refused refused) {
            out[10] = refused.getMessage();
            return out;
        }
        String reason = validate(event, out);
        if (reason != null) {
            Object user = event.get("user_id");
            String id = user == null ? null : user.toString();
            java.util.Arrays.fill(out, null);
            out[0] = id != null && !id.isEmpty() && isPrintable(id) && codePoints(id) <= MAX_ID_CHARS ? id : null;
            out[10] = reason;
        }
        return out;
    }

    private GenericRecord read(byte[] data) throws Refused {
        if (data == null || data.length < HEADER_LEN) {
            throw new Refused("not single-object encoded: " + (data == null ? 0 : data.length) + " bytes");
        }
        if ((data[0] & 0xff) != 0xc3 || (data[1] & 0xff) != 0x01) {
            throw new Refused("not single-object encoded: marker " + HexFormat.of().formatHex(data, 0, 2)
                    + " is not c301");
        }
        long fingerprint = ByteBuffer.wrap(data, 2, 8).order(java.nio.ByteOrder.LITTLE_ENDIAN).getLong();
        GenericDatumReader<GenericRecord> reader = readers.get(fingerprint);
        if (reader == null) {
            throw new Refused("unknown schema fingerprint " + HexFormat.of().formatHex(data, 2, HEADER_LEN)
                    + " for " + NAME);
        }
        binary = DecoderFactory.get().binaryDecoder(data, HEADER_LEN, data.length - HEADER_LEN, binary);
        in.of(binary);
        GenericRecord record;
        try {
            record = reader.read(reader == current ? reuse : null, in);
            if (reader == current) {
                reuse = record;
            }
        } catch (Malformed e) {
            throw new Refused("invalid Avro datum for " + NAME + ": " + e.getMessage());
        } catch (Exception | StackOverflowError e) {
            throw new Refused("invalid Avro datum for " + NAME + ": " + e.getClass().getSimpleName() + ": "
                    + e.getMessage());
        }
        int left;
        try {
            left = binary.isEnd() ? 0 : binary.inputStream().available();
        } catch (IOException e) {
            left = -1;
        }
        if (left != 0) {
            throw new Refused((left < 0 ? "some" : String.valueOf(left)) + " trailing bytes after the " + NAME
                    + " datum");
        }
        return record;
    }

    /** decode.validate: fills out[0..9] and returns null, or returns the reason. */
    private static String validate(GenericRecord event, Object[] out) {
        String user = event.get("user_id").toString();
        if (user.isEmpty() || isBlank(user)) {
            return "user_id is empty";
        }
        for (String name : ID_FIELDS) {
            Object value = event.get(name);
            if (value == null) {
                continue;
            }
            String text = value.toString();
            int n = codePoints(text);
            if (n > MAX_ID_CHARS) {
                return name + " is longer than " + MAX_ID_CHARS + " characters (" + n + ")";
            }
            if (!isPrintable(text)) {
                return name + " contains a control character";
            }
        }
        long eventMs = ((Number) event.get("event_time")).longValue();
        if (eventMs < 0 || eventMs > MAX_EVENT_MS) {
            return "event_time " + eventMs + " is outside 1970-01-01..9999-12-31";
        }
        String type = event.get("event_type").toString();
        Object product = event.get("product_id");
        String productId = product == null ? null : product.toString();
        if ((productId == null || productId.isEmpty()) && needsProduct(type)) {
            return type + " without product_id";
        }
        Object price = event.get("price");
        Long cents = null;
        if (price != null) {
            double p = (Double) price;
            if (Double.isNaN(p) || Double.isInfinite(p)) {
                return "price is not a finite number";
            }
            if (p <= -PRICE_LIMIT) {
                return "price is negative";
            }
            if (p >= PRICE_LIMIT) {
                return "price is above " + MAX_PRICE_CENTS / 100;
            }
            cents = toCents(p);
            if (cents < 0) {
                return "price is negative";
            }
            if (cents > MAX_PRICE_CENTS) {
                return "price is above " + MAX_PRICE_CENTS / 100;
            }
        }
        long quantity = ((Number) event.get("quantity")).longValue();
        if (quantity < 1) {
            return "quantity " + quantity + " is below 1";
        }
        if (quantity > MAX_QUANTITY) {
            return "quantity " + quantity + " is above " + MAX_QUANTITY;
        }
        out[0] = user;
        out[1] = type;
        out[2] = productId;
        Object category = event.get("category");
        out[3] = category == null ? null : category.toString();
        out[4] = cents;
        out[5] = quantity;
        out[6] = event.get("consent_analytics");
        out[7] = event.get("consent_personalization");
        out[8] = event.get("consent_marketing");
        out[9] = event.get("event_time");
        return null;
    }

    private static boolean needsProduct(String type) {
        return switch (type) {
            case "product_view", "add_to_cart", "remove_from_cart", "purchase" -> true;
            default -> false;
        };
    }

    /**
     * A price as integer cents, rounded half-even from its shortest decimal form (Python's
     * {@code repr}, which decode.to_cents reads): 2.675 is 268 cents, though the double is
     * a little below 2.675. |price| < 1e13 here, where two decimals that both round-trip
     * to the same double cannot differ by a cent.
     */
    static long toCents(double price) {
        BigDecimal quick = BigDecimal.valueOf(price); // Double.toString: round-trips, not always shortest
        if (quick.scale() <= 2 || quick.stripTrailingZeros().scale() <= 2) {
            return quick.movePointRight(2).longValueExact();
        }
        return shortest(price).movePointRight(2).setScale(0, RoundingMode.HALF_EVEN).longValueExact();
    }

    /** The shortest decimal that reads back as this double, the nearest one among equals. */
    static BigDecimal shortest(double value) {
        if (value == 0) {
            return BigDecimal.ZERO;
        }
        BigDecimal exact = new BigDecimal(value);
        for (int digits = 1; digits < 17; digits++) {
            BigDecimal candidate = exact.round(new MathContext(digits, RoundingMode.HALF_EVEN));
            if (candidate.doubleValue() == value) {
                return candidate;
            }
        }
        return exact.round(new MathContext(17, RoundingMode.HALF_EVEN));
    }

    static int codePoints(String text) {
        return text.codePointCount(0, text.length());
    }

    /** Python's str.isprintable(): no character of the categories Cc, Cf, Cs, Co, Cn, Zl, Zp, Zs but the space. */
    static boolean isPrintable(String text) {
        for (int i = 0; i < text.length(); ) {
            int cp = text.codePointAt(i);
            i += Character.charCount(cp);
            if (cp == ' ') {
                continue;
            }
            switch (Character.getType(cp)) {
                case Character.CONTROL, Character.FORMAT, Character.SURROGATE, Character.PRIVATE_USE,
                     Character.UNASSIGNED, Character.LINE_SEPARATOR, Character.PARAGRAPH_SEPARATOR,
                     Character.SPACE_SEPARATOR:
                    return false;
                default:
                    break;
            }
        }
        return true;
    }

    /** Python's {@code not text.strip()}: only characters of str.isspace(). */
    static boolean isBlank(String text) {
        for (int i = 0; i < text.length(); ) {
            int cp = text.codePointAt(i);
            i += Character.charCount(cp);
            if (!isPythonSpace(cp)) {
                return false;
            }
        }
        return true;
    }

    static boolean isPythonSpace(int cp) {
        return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0
                || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029
                || cp == 0x202f || cp == 0x205f || cp == 0x3000;
    }

    /** A record that cannot be read; the message is the reason. */
    static final class Refused extends Exception {
        Refused(String reason) {
            super(reason, null, false, false);
        }
    }

    /** Data Avro's Java library would read, refused as fastavro (and decode.py) refuse it. */
    static final class Malformed extends AvroRuntimeException {
        Malformed(String message) {
            super(message);
        }
    }

    /** Avro's binary decoder, reading invalid data as fastavro does (see the class comment). */
    static final class FastavroDecoder extends Decoder {
        private final CharsetDecoder utf8 = StandardCharsets.UTF_8.newDecoder()
                .onMalformedInput(CodingErrorAction.REPORT).onUnmappableCharacter(CodingErrorAction.REPORT);
        private final byte[] one = new byte[1]; // a boolean's byte, read per event: no allocation
        private BinaryDecoder d;

        void of(BinaryDecoder decoder) {
            d = decoder;
        }

        @Override public void readNull() throws IOException { d.readNull(); }
        @Override public boolean readBoolean() throws IOException {
            d.readFixed(one, 0, 1);
            return one[0] != 0;
        }
        @Override public int readInt() throws IOException {
            long value = d.readLong();
            if (value < Integer.MIN_VALUE || value > Integer.MAX_VALUE) {
                throw new Malformed("int out of range: " + value);
            }
            return (int) value;
        }
        @Override public long readLong() throws IOException { return d.readLong(); }
        @Override public float readFloat() throws IOException { return d.readFloat(); }
        @Override public double readDouble() throws IOException { return d.readDouble(); }
        @Override public Utf8 readString(Utf8 old) throws IOException {
            Utf8 text = d.readString(old);
            byte[] bytes = text.getBytes();
            int n = text.getByteLength();
            for (int i = 0; i < n; i++) {
                if (bytes[i] < 0) { // not ASCII: check it all strictly
                    try {
                        utf8.reset().decode(ByteBuffer.wrap(bytes, 0, n));
                    } catch (CharacterCodingException e) {
                        throw new Malformed("string is not valid UTF-8: " + e.getMessage());
                    }
                    break;
                }
            }
            return text;
        }
        @Override public String readString() throws IOException { return readString(null).toString(); }
        @Override public void skipString() throws IOException { d.skipString(); }
        @Override public ByteBuffer readBytes(ByteBuffer old) throws IOException { return d.readBytes(old); }
        @Override public void skipBytes() throws IOException { d.skipBytes(); }
        @Override public void readFixed(byte[] bytes, int start, int length) throws IOException {
            d.readFixed(bytes, start, length);
        }
        @Override public void skipFixed(int length) throws IOException { d.skipFixed(length); }
        @Override public int readEnum() throws IOException { return readInt(); }
        @Override public long readArrayStart() throws IOException { return d.readArrayStart(); }
        @Override public long arrayNext() throws IOException { return d.arrayNext(); }
        @Override public long skipArray() throws IOException { return d.skipArray(); }
        @Override public long readMapStart() throws IOException { return d.readMapStart(); }
        @Override public long mapNext() throws IOException { return d.mapNext(); }
        @Override public long skipMap() throws IOException { return d.skipMap(); }
        @Override public int readIndex() throws IOException { return readInt(); }
    }
}
