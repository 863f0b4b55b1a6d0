package personalize.decode;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.HexFormat;

/**
 * Decodes a corpus for the test that holds this decoder and the Python one to the same
 * results: reads lines {@code <label>\t<hex of the record value>} (hex "-" for a null
 * value) from stdin and prints one JSON array per line: the label and the eleven values.
 * An argument, if given, is the pseudonym key (user ids come out as their pseudonyms).
 */
public final class DecodeCorpus {
    public static void main(String[] args) throws Exception {
        DecodeEvent decoder = new DecodeEvent(args.length > 0 ? args[0] : "");
        BufferedReader lines = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        PrintStream out = new PrintStream(System.out, false, StandardCharsets.UTF_8);
        for (String line; (line = lines.readLine()) != null; ) {
            if (line.isEmpty()) {
                continue;
            }
            int tab = line.indexOf('\t');
            String hex = line.substring(tab + 1);
            byte[] value = hex.equals("-") ? null : HexFormat.of().parseHex(hex);
            StringBuilder json = new StringBuilder("[");
            string(json, line.substring(0, tab));
            for (Object field : decoder.fields(value)) {
                json.append(", ");
                if (field instanceof String text) {
                    string(json, text);
                } else {
                    json.append(field); // null, a Long or a Boolean
                }
            }
            out.println(json.append(']'));
        }
        out.flush();
    }

    private static void string(StringBuilder json, String text) {
        json.append('"');
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            if (c == '"' || c == '\\') {
                json.append('\\').append(c);
            } else if (c < 0x20 || c > 0x7e) {
                json.append(String.format("\\u%04x", (int) c));
            } else {
                json.append(c);
            }
        }
        json.append('"');
    }
}
