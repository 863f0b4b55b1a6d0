package personalize.profile;

/** The little JSON the live fields hold (the session's cart lines), and money as text. */
final class Json {
    private Json() {}

    /** A JSON string literal of {@code s}, escaped as RFC 8259 requires. */
    static void string(StringBuilder out, String s) {
        out.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        out.append('"');
    }

    /** Integer cents as a decimal with exactly two places ({@code -0.05}, {@code 12.30}). */
    static String cents(long cents) {
        String sign = cents < 0 ? "-" : "";
        long abs = Math.abs(cents);
        return sign + (abs / 100) + "." + (abs % 100 < 10 ? "0" : "") + (abs % 100);
    }
}
