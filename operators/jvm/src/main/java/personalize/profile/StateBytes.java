package personalize.profile;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;

/**
 * The little binary codec of {@link UserState}: longs and ints big-endian, strings as UTF-8 with
 * an int length. Read and written whole around every event, so it is plain array and buffer
 * work (a DataInput/DataOutputStream pair cost a sixth of the function's time, measured).
 */
final class StateBytes {
    private StateBytes() {}

    static final class Writer {
        private byte[] buf;
        private int at;

        Writer(int capacity) {
            buf = new byte[capacity];
        }

        private void room(int n) {
            if (at + n > buf.length) {
                buf = Arrays.copyOf(buf, Math.max(buf.length * 2, at + n));
            }
        }

        Writer u8(int v) {
            room(1);
            buf[at++] = (byte) v;
            return this;
        }

        Writer i32(int v) {
            room(4);
            buf[at++] = (byte) (v >>> 24);
            buf[at++] = (byte) (v >>> 16);
            buf[at++] = (byte) (v >>> 8);
            buf[at++] = (byte) v;
            return this;
        }

        Writer i64(long v) {
            room(8);
            for (int shift = 56; shift >= 0; shift -= 8) {
                buf[at++] = (byte) (v >>> shift);
            }
            return this;
        }

        Writer str(CharSequence s) {
            byte[] utf8 = s.toString().getBytes(StandardCharsets.UTF_8);
            i32(utf8.length);
            room(utf8.length);
            System.arraycopy(utf8, 0, buf, at, utf8.length);
            at += utf8.length;
            return this;
        }

        byte[] bytes() {
            return Arrays.copyOf(buf, at);
        }
    }

    static final class Reader {
        private final ByteBuffer in;

        Reader(byte[] data) {
            in = ByteBuffer.wrap(data);
        }

        int u8() {
            return in.get() & 0xff;
        }

        int i32() {
            return in.getInt();
        }

        long i64() {
            return in.getLong();
        }

        String str() {
            int n = in.getInt();
            String s = new String(in.array(), in.arrayOffset() + in.position(), n, StandardCharsets.UTF_8);
            in.position(in.position() + n);
            return s;
        }
    }
}
