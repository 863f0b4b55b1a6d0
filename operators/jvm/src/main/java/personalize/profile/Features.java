package personalize.profile;

import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;

/**
 * The propensity model's features of a session, the JVM twin of {@code operators/models.py}'s
 * {@code propensity_features}: the user's closed-session history before the session, and the
 * session's product views and cart moves before its first checkout or purchase (read from its
 * lists, as Python reads the closed row). For the session in progress they are the features
 * "so far", which {@link PropensityModel#score} turns into {@code session_propensity}.
 * {@code tests/unit/operators/test_features_jvm.py} holds both twins to the same values.
 */
public final class Features {
    public static final int COUNT = 19;
    private static final double HOUR_MS = 3_600_000.0;

    private Features() {}

    /** The closed sessions with personalization consent the models folded, as they see them. */
    public record History(long sessions, long purchaseSessions, long revenueCents, Long lastEndMs) {}

    public static double[] propensity(UserState.Session s, History h) {
        double cutoff = s.outcomeMs >= 0 ? s.outcomeMs : Double.POSITIVE_INFINITY;
        long start = s.startMs;
        long now = start;
        List<String> products = new java.util.ArrayList<>();
        List<String> categories = new java.util.ArrayList<>();
        for (String item : items(s.viewed)) {
            String[] f = item.split(String.valueOf(UserState.FIELD_SEP), -1);
            long at = Long.parseLong(f[2]);
            if (at < cutoff) {
                products.add(f[0]);
                if (!f[1].isEmpty()) {
                    categories.add(f[1]);
                }
                now = Math.max(now, at);
            }
        }
        Set<String> carted = new HashSet<>();
        Map<String, long[]> cart = new TreeMap<>(); // product -> added, removed, time of latest add, its cents
        long adds = 0, removes = 0;
        Long lastAdd = null;
        for (String move : items(s.moves)) {
            String[] f = move.split(String.valueOf(UserState.FIELD_SEP), -1);
            long at = Long.parseLong(f[4]);
            if (at >= cutoff) {
                continue;
            }
            now = Math.max(now, at);
            long[] c = cart.computeIfAbsent(f[1], k -> new long[] {0, 0, -1, -1});
            long quantity = Long.parseLong(f[2]);
            if (f[0].equals("+")) {
                adds++;
                carted.add(f[1]);
                lastAdd = lastAdd == null ? at : Math.max(lastAdd, at);
                c[0] += quantity;
                long cents = f[3].isEmpty() ? 0 : Long.parseLong(f[3]);
                if (at > c[2] || (at == c[2] && cents > c[3])) {
                    c[2] = at;
                    c[3] = cents;
                }
            } else {
                removes++;
                c[1] += quantity;
            }
        }
        long lines = 0, value = 0;
        for (long[] c : cart.values()) {
            long quantity = c[0] - c[1];
            if (c[0] > 0 && quantity > 0) {
                lines++;
                value += quantity * c[3];
            }
        }
        int distinct = new HashSet<>(products).size();
        long cartedViews = 0;
        for (String p : products) {
            cartedViews += carted.contains(p) ? 1 : 0;
        }
        double recencyH = h.lastEndMs() != null ? (start - h.lastEndMs()) / HOUR_MS : 0.0;
        double hour = 2 * Math.PI * Math.floorMod(Math.floorDiv(start, 3_600_000L), 24L) / 24;
        return new double[] {
            h.sessions() == 0 ? 1.0 : 0.0,
            Math.log1p(h.sessions()),
            h.sessions() > 0 ? (double) h.purchaseSessions() / h.sessions() : 0.0,
            Math.log1p(h.revenueCents() / 100.0),
            Math.log1p(recencyH > 0 ? recencyH : 0.0),
            Math.log1p(products.size()),
            Math.log1p(distinct),
            Math.log1p(products.size() - distinct),
            carted.isEmpty() ? 0.0 : Math.log1p(cartedViews),
            Math.log1p(new HashSet<>(categories).size()),
            affinity(categories),
            Math.log1p(adds),
            Math.log1p(removes),
            (double) lines,
            Math.log1p(value / 100.0),
            lastAdd != null ? Math.log1p((now - lastAdd) / 60_000.0) : 0.0,
            Math.log1p((now - start) / 60_000.0),
            Math.sin(hour),
            Math.cos(hour),
        };
    }

    /**
     * The segmenter's features of a closed session, the twin of {@code segment_features} in
     * {@code operators/models.py}: the profile after the session (its history's sessions and
     * revenue with it folded in), the session's recency against the history's last end before it
     * (null: none), its events, cart adds and category affinity.
     */
    public static double[] segment(UserState.Session s, long sessionsAfter, long revenueCentsAfter, Long beforeEndMs) {
        double recencyH = beforeEndMs != null ? (s.startMs - beforeEndMs) / HOUR_MS : 0.0;
        List<String> categories = new java.util.ArrayList<>();
        for (String c : items(s.categories)) {
            if (!c.isEmpty()) {
                categories.add(c);
            }
        }
        return new double[] {
            Math.log1p(Math.max(recencyH, 0.0)),
            Math.log1p(sessionsAfter),
            Math.log1p(revenueCentsAfter / 100.0),
            Math.log1p(s.nEvents),
            Math.log1p(s.byType[UserState.ADD]),
            affinity(categories),
        };
    }

    /** Share of the categorised events in the most frequent category (0 when none). */
    static double affinity(List<String> names) {
        if (names.isEmpty()) {
            return 0.0;
        }
        Map<String, Integer> counts = new HashMap<>();
        int top = 0;
        for (String name : names) {
            top = Math.max(top, counts.merge(name, 1, Integer::sum));
        }
        return (double) top / names.size();
    }

    private static String[] items(CharSequence list) {
        return list.length() == 0 ? new String[0] : list.toString().split(String.valueOf(UserState.ITEM_SEP), -1);
    }
}
