package personalize.profile;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;

/**
 * Runs a corpus through {@link UserState}, {@link Features} and {@link PropensityModel} for the
 * test that holds them to their Python twins ({@code tests/unit/operators/test_features_jvm.py}).
 * Reads JSON lines from stdin: the first {@code {"snapshot": ...}}, a model snapshot as the
 * models step publishes it; then one per user, {@code {"sessions": [[event, ...], ...]}}, each
 * event {@code [type, product, category, price_cents, quantity, consent_personalization,
 * time_ms]}. For every session it applies the events, prints the live features of the session
 * in progress and their score ({@code {"features": [...], "score": "0.123456"}}), then closes
 * it and prints its packed row ({@code {"packed": "..."}}).
 */
public final class FeaturesCorpus {
    public static void main(String[] args) throws Exception {
        ObjectMapper json = new ObjectMapper();
        BufferedReader lines = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        PrintStream out = new PrintStream(System.out, false, StandardCharsets.UTF_8);
        PropensityModel model = PropensityModel.parse(lines.readLine().getBytes(StandardCharsets.UTF_8));
        int user = 0;
        for (String line; (line = lines.readLine()) != null; user++) {
            UserState state = new UserState();
            for (JsonNode session : json.readTree(line).get("sessions")) {
                for (JsonNode e : session) {
                    state.apply(new UserState.Event("u" + user, e.get(0).asText(), text(e.get(1)), text(e.get(2)),
                            e.get(3).isNull() ? null : e.get(3).asLong(), e.get(4).asInt(), e.get(5).asBoolean(), true,
                            e.get(6).asLong(), 0), 30 * 60_000L, 300_000L, 6, 1000);
                    state = UserState.fromBytes(state.toBytes());
                }
                double[] features = Features.propensity(state.current(), state.history());
                StringBuilder row = new StringBuilder("{\"features\": [");
                for (int i = 0; i < features.length; i++) {
                    row.append(i > 0 ? ", " : "").append(Double.toString(features[i]));
                }
                row.append("], \"score\": ");
                row.append(model == null ? "null" : "\"" + LiveStateFunction.sixDecimals(model.score(features)) + "\"");
                out.println(row.append('}'));
                for (UserState.Session closed : state.closeDue(Long.MAX_VALUE, 30 * 60_000L)) {
                    out.println(json.writeValueAsString(java.util.Map.of("packed", closed.packed("u" + user, 0))));
                }
            }
        }
        out.flush();
    }

    private static String text(JsonNode node) {
        return node == null || node.isNull() ? null : node.asText();
    }
}
