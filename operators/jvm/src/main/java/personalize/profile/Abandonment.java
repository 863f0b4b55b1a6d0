package personalize.profile;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Comparator;
import java.util.List;
import java.util.TreeMap;

/**
 * The cart-abandonment trigger of a closed session, as far as the JVM knows it at the close: the
 * twin of {@code operators/triggers.py} ({@code abandonment}, {@code net_lines}, {@code trigger_id}),
 * written as the Avro binary of the Trigger's fields up to {@code cart_value} (schemas/trigger.avsc).
 * The models' step appends what only it knows (propensity, segment) and the close's time, and
 * puts the single-object header in front, so a trigger costs Python a few bytes, not a record.
 * Held byte for byte to fastavro's encoding of the Python function's record by
 * {@code tests/unit/operators/test_features_jvm.py}.
 */
final class Abandonment {
    static final String KIND = "cart_abandonment";
    /** triggers.MAX_CART_LINES: the most valuable lines a trigger lists */
    static final int MAX_CART_LINES = 100;
    /** triggers._NAMESPACE: the same (user, session start) gives the same id in every run */
    private static final byte[] NAMESPACE = hex("6f1d3c2a5b7e4e8f9a0b1c2d3e4f5a6b");
    /** Python's order of str: by code point (String.compareTo orders UTF-16 units) */
    static final Comparator<String> CODE_POINTS = (a, b) -> {
        int i = 0, j = 0;
        while (i < a.length() && j < b.length()) {
            int x = a.codePointAt(i), y = b.codePointAt(j);
            if (x != y) {
                return Integer.compare(x, y);
            }
            i += Character.charCount(x);
            j += Character.charCount(y);
        }
        return Integer.compare(a.length() - i, b.length() - j);
    };

    private Abandonment() {}

    /**
     * The Avro body of the trigger's fields from trigger_id to cart_value, base64; null when none
     * is due: a purchase in the session, no marketing consent (its latest event's), or an empty
     * net cart. {@code moves} are the session's listed cart moves (sign, product, quantity, cents,
     * time joined by the field separator), as the Python step reads them.
     */
    static String prefix(String userId, long startMs, long endMs, long purchases, boolean marketing,
                         CharSequence moves) {
        if (purchases > 0 || !marketing) {
            return null;
        }
        List<Object[]> lines = netLines(moves);
        if (lines.isEmpty()) {
            return null;
        }
        if (lines.size() > MAX_CART_LINES) {
            lines.sort((a, b) -> {
                int byValue = Long.compare((long) b[1] * (long) b[2], (long) a[1] * (long) a[2]);
                return byValue != 0 ? byValue : CODE_POINTS.compare((String) a[0], (String) b[0]);
            });
            lines = new ArrayList<>(lines.subList(0, MAX_CART_LINES));
            lines.sort((a, b) -> CODE_POINTS.compare((String) a[0], (String) b[0]));
        }
        Avro out = new Avro();
        out.string(triggerId(userId, startMs)).string(KIND).string(userId).zigzag(startMs).zigzag(endMs);
        out.zigzag(lines.size());
        long value = 0;
        for (Object[] line : lines) {
            long quantity = (long) line[1], cents = (long) line[2];
            out.string((String) line[0]).zigzag(quantity).decimal(cents);
            value += quantity * cents;
        }
        out.zigzag(0).decimal(value);
        return Base64.getEncoder().encodeToString(out.toByteArray());
    }

    /** triggers.net_lines: {product, quantity, cents} with quantity above 0, by product id. */
    static List<Object[]> netLines(CharSequence moves) {
        // added, removed, the latest add's time and cents, whether added at all
        TreeMap<String, long[]> byProduct = new TreeMap<>(CODE_POINTS);
        String all = moves.toString();
        if (!all.isEmpty()) {
            for (String move : all.split(String.valueOf(UserState.ITEM_SEP), -1)) {
                if (move.isEmpty()) {
                    continue;
                }
                String[] f = move.split(String.valueOf(UserState.FIELD_SEP), -1);
                long[] c = byProduct.computeIfAbsent(f[1], k -> new long[] {0, 0, -1, -1, 0});
                long quantity = Long.parseLong(f[2]);
                if (f[0].equals("+")) {
                    c[0] += quantity;
                    c[4] = 1;
                    long at = Long.parseLong(f[4]), cents = f[3].isEmpty() ? 0 : Long.parseLong(f[3]);
                    if (at > c[2] || (at == c[2] && cents > c[3])) {
                        c[2] = at;
                        c[3] = cents;
                    }
                } else {
                    c[1] += quantity;
                }
            }
        }
        List<Object[]> lines = new ArrayList<>();
        for (var e : byProduct.entrySet()) {
            long[] c = e.getValue();
            if (c[4] == 1 && c[0] - c[1] > 0) {
                lines.add(new Object[] {e.getKey(), c[0] - c[1], c[3]});
            }
        }
        return lines;
    }

    /** triggers.trigger_id: uuid5 of "cart_abandonment|user|start" in the fixed namespace. */
    static String triggerId(String userId, long startMs) {
        MessageDigest sha1;
        try {
            sha1 = MessageDigest.getInstance("SHA-1");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
        sha1.update(NAMESPACE);
        byte[] h = sha1.digest((KIND + "|" + userId + "|" + startMs).getBytes(StandardCharsets.UTF_8));
        h[6] = (byte) ((h[6] & 0x0f) | 0x50);
        h[8] = (byte) ((h[8] & 0x3f) | 0x80);
        StringBuilder id = new StringBuilder(36);
        for (int i = 0; i < 16; i++) {
            if (i == 4 || i == 6 || i == 8 || i == 10) {
                id.append('-');
            }
            id.append(Character.forDigit((h[i] >> 4) & 0xf, 16)).append(Character.forDigit(h[i] & 0xf, 16));
        }
        return id.toString();
    }

    private static byte[] hex(String s) {
        byte[] out = new byte[s.length() / 2];
        for (int i = 0; i < out.length; i++) {
            out[i] = (byte) Integer.parseInt(s.substring(2 * i, 2 * i + 2), 16);
        }
        return out;
    }

    /** Avro's binary encoding of the few kinds a trigger has. */
    static final class Avro extends ByteArrayOutputStream {
        Avro zigzag(long n) {
            long z = (n << 1) ^ (n >> 63);
            while ((z & ~0x7fL) != 0) {
                write((int) ((z & 0x7f) | 0x80));
                z >>>= 7;
            }
            write((int) z);
            return this;
        }

        Avro string(String s) {
            byte[] b = s.getBytes(StandardCharsets.UTF_8);
            zigzag(b.length);
            write(b, 0, b.length);
            return this;
        }

        /**
         * A decimal's unscaled value as bytes, big-endian two's complement, in as many bytes as
         * fastavro gives it: (bit length of its magnitude + 8) / 8 (for -128 two bytes, not one).
         */
        Avro decimal(long unscaled) {
            int magnitudeBits = 64 - Long.numberOfLeadingZeros(Math.abs(unscaled));
            int n = (magnitudeBits + 8) / 8;
            zigzag(n);
            for (int i = n - 1; i >= 0; i--) {
                write((int) (i >= 8 ? (unscaled < 0 ? 0xff : 0) : (unscaled >> (8 * i)) & 0xff));
            }
            return this;
        }
    }
}
