package personalize.profile;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * Everything the profile needs of one user, updated per event: the totals of the events
 * with personalization consent (per type, revenue in cents, first and last seen, events by
 * hour of day), the consent flag of the newest event, the sliding "recent" window as slices,
 * and the sessions still open (the session in progress; a second one only while an
 * out-of-order event can still bridge them). Pure logic: {@link LiveStateFunction} holds it in
 * Flink state (the object itself, {@link UserStateSerializer}) and calls it per row and per timer.
 *
 * <p>Semantics (DESIGN.md): a session ends when the next event comes at least {@code gapMs}
 * after its last; it closes when the watermark reaches its last event + gap - 1 (every later
 * event that is not late then starts a new session). Its closed row is the one the SQL
 * SESSION window wrote before ({@link Session#packed}), for the models in Python.
 */
public final class UserState {
    public static final String[] EVENT_TYPES = {
        "page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout", "purchase", "search"};
    static final int PAGE_VIEW = 0, PRODUCT_VIEW = 1, ADD = 2, REMOVE = 3, CHECKOUT = 4, PURCHASE = 5, SEARCH = 6;
    /** changes a version counts within one newest event time (version = newest time * this + changes). */
    public static final long CHANGES_PER_MS = 10_000L;
    /**
     * the state bytes' format: 2 adds {@link #sessionTimerMs} (format 1 reads as -1, none known),
     * 3 the products bought (formats 1 and 2 read with none: the list starts at the upgrade)
     */
    private static final int FORMAT = 3;
    /** the products bought a user's profile lists (the newest distinct ones) */
    public static final int BOUGHT_KEPT = 20;
    static final char FIELD_SEP = '\u001f', ITEM_SEP = '\u001e', COLUMN_SEP = '\u001d';

    /** One decoded event, as the job's SQL hands it to the function. */
    public record Event(String userId, String type, String productId, String category, Long priceCents,
                        Integer quantity, boolean consentPersonalization, boolean consentMarketing, long timeMs,
                        long epoch) {
        int typeIndex() {
            for (int i = 0; i < EVENT_TYPES.length; i++) {
                if (EVENT_TYPES[i].equals(type)) {
                    return i;
                }
            }
            return -1;
        }
    }

    // -- who, the user's erasure epoch and the version of the newest change
    String userId = "";
    long epoch;
    long newestMs = Long.MIN_VALUE; // the newest event time of any event (consented or not)
    long changes;                  // changes since newestMs last moved
    long expiryTimerMs = -1;       // the time of the timer that expires an inactive user's state (-1: none)
    long sessionTimerMs = -1;      // the pending timer at or before the open sessions' earliest close (-1: none known)
    // -- totals, of events with personalization consent
    long nEvents;
    final long[] byType = new long[EVENT_TYPES.length];
    long revenueCents;
    long firstSeenMs = Long.MAX_VALUE;
    long lastSeenMs = Long.MIN_VALUE;
    final long[] byHour = new long[24];
    long consentKey = -1;          // max(event time * 2 + flag) of every event: the newest event's flag
    // -- recent: slice index -> consented events and product views, newest `slices` kept
    long[] sliceIndex = new long[0];
    long[] sliceEvents = new long[0];
    long[] sliceViews = new long[0];
    // -- open sessions, by start
    final List<Session> open = new ArrayList<>();
    // -- closed sessions with personalization consent, as the models fold them (Features.History)
    long histSessions, histPurchaseSessions, histRevenueCents;
    long histLastEndMs = -1;
    // -- the newest distinct products bought with personalization consent (newest first; ties by id)
    final List<String> boughtIds = new ArrayList<>();
    final List<Long> boughtMs = new ArrayList<>();

    /** The version of the state: the newest event time, then the changes made since. */
    public long version() {
        return newestMs * CHANGES_PER_MS + Math.min(changes, CHANGES_PER_MS - 1);
    }

    public long epoch() {
        return epoch;
    }

    public String userId() {
        return userId;
    }

    public boolean consent() {
        return consentKey >= 0 && consentKey % 2 == 1;
    }

    public long consentMs() {
        return consentKey >= 0 ? consentKey / 2 : -1;
    }

    /** An open session and what its closed row and the live fields need. */
    public static final class Session {
        long startMs, endMs, nEvents, revenueCents, outcomeMs = -1, lastAddMs = -1;
        final long[] byType = new long[EVENT_TYPES.length];
        long consentPKey = -1, consentMKey = -1;
        final StringBuilder moves = new StringBuilder(), categories = new StringBuilder(), viewed = new StringBuilder();
        int nMoves, nCategories, nViewed;
        /** product -> {added, removed, time of the latest add, its price in cents} */
        final TreeMap<String, long[]> cart = new TreeMap<>();
        /** category -> events in the session (at most the list limit of categories) */
        final TreeMap<String, long[]> categoryCounts = new TreeMap<>();
        /** product ids the session touched (viewed or carted; at most the list limit) */
        final TreeMap<String, Boolean> products = new TreeMap<>();
        /**
         * The models' features of a closed session with personalization consent, set by
         * {@link #closeDue} from the history before it (propensity) and after it (segment); not state.
         */
        double[] propensityFeatures, segmentFeatures;

        public long startMs() {
            return startMs;
        }

        public long endMs() {
            return endMs;
        }

        public long nEvents() {
            return nEvents;
        }

        public long productViews() {
            return byType[PRODUCT_VIEW];
        }

        public int distinctProducts() {
            return products.size();
        }

        public long lastCartAddMs() {
            return lastAddMs;
        }

        /** The most frequent category of the session (ties: the first by name), or null. */
        public String topCategory() {
            String top = null;
            long best = 0;
            for (Map.Entry<String, long[]> e : categoryCounts.entrySet()) {
                if (e.getValue()[0] > best) {
                    best = e.getValue()[0];
                    top = e.getKey();
                }
            }
            return top;
        }

        /** The net cart lines (product id, quantity, price in cents), by product id. */
        public List<long[]> cartQuantities(List<String> productsOut) {
            List<long[]> lines = new ArrayList<>();
            for (Map.Entry<String, long[]> e : cart.entrySet()) {
                long[] c = e.getValue();
                long quantity = c[0] - c[1];
                if (c[0] > 0 && quantity > 0) {
                    productsOut.add(e.getKey());
                    lines.add(new long[] {quantity, c[3]});
                }
            }
            return lines;
        }

        /** The net cart as JSON lines and its value in cents (null when empty). */
        public String cartJson() {
            List<String> ids = new ArrayList<>();
            List<long[]> lines = cartQuantities(ids);
            if (lines.isEmpty()) {
                return null;
            }
            StringBuilder out = new StringBuilder("[");
            for (int i = 0; i < lines.size(); i++) {
                if (i > 0) {
                    out.append(',');
                }
                out.append("{\"product_id\":");
                Json.string(out, ids.get(i));
                out.append(",\"quantity\":").append(lines.get(i)[0]).append(",\"price\":\"")
                        .append(Json.cents(lines.get(i)[1])).append("\"}");
            }
            return out.append(']').toString();
        }

        public long cartValueCents() {
            long value = 0;
            for (long[] line : cartQuantities(new ArrayList<>())) {
                value += line[0] * line[1];
            }
            return value;
        }

        void add(Event e, int type, int limit) {
            if (nEvents == 0) {
                startMs = e.timeMs();
                endMs = e.timeMs();
            }
            startMs = Math.min(startMs, e.timeMs());
            endMs = Math.max(endMs, e.timeMs());
            nEvents++;
            if (type >= 0) {
                byType[type]++;
            }
            if (type == PURCHASE && e.quantity() != null) {
                revenueCents += (e.priceCents() == null ? 0 : e.priceCents()) * e.quantity();
            }
            if ((type == CHECKOUT || type == PURCHASE) && (outcomeMs < 0 || e.timeMs() < outcomeMs)) {
                outcomeMs = e.timeMs();
            }
            consentPKey = Math.max(consentPKey, e.timeMs() * 2 + (e.consentPersonalization() ? 1 : 0));
            consentMKey = Math.max(consentMKey, e.timeMs() * 2 + (e.consentMarketing() ? 1 : 0));
            if (type == ADD || type == REMOVE) {
                if (nMoves < limit) {
                    item(moves, nMoves++, concatWs(type == ADD ? "+" : "-", e.productId(),
                            e.quantity() == null ? null : e.quantity().toString(),
                            e.priceCents() == null ? "" : e.priceCents().toString(), Long.toString(e.timeMs())));
                }
                if (e.productId() != null && e.quantity() != null
                        && (cart.containsKey(e.productId()) || cart.size() < limit)) {
                    long[] c = cart.computeIfAbsent(e.productId(), k -> new long[] {0, 0, -1, -1});
                    if (type == ADD) {
                        c[0] += e.quantity();
                        long cents = e.priceCents() == null ? 0 : e.priceCents();
                        if (e.timeMs() > c[2] || (e.timeMs() == c[2] && cents > c[3])) {
                            c[2] = e.timeMs();
                            c[3] = cents; // the latest add's price; at the same time, the higher
                        }
                    } else {
                        c[1] += e.quantity();
                    }
                }
                if (type == ADD) {
                    lastAddMs = Math.max(lastAddMs, e.timeMs());
                }
            }
            if (e.category() != null) {
                if (nCategories < limit) {
                    item(categories, nCategories++, e.category());
                }
                if (categoryCounts.containsKey(e.category()) || categoryCounts.size() < limit) {
                    categoryCounts.computeIfAbsent(e.category(), k -> new long[1])[0]++;
                }
            }
            if (type == PRODUCT_VIEW && nViewed < limit) {
                item(viewed, nViewed++, concatWs(nz(e.productId()), nz(e.category()), Long.toString(e.timeMs())));
            }
            if (e.productId() != null && !e.productId().isEmpty() && (type == PRODUCT_VIEW || type == ADD)
                    && products.size() < limit) {
                products.put(e.productId(), Boolean.TRUE);
            }
        }

        /** Fold a later-starting session into this one (an out-of-order event bridged them). */
        void merge(Session other, int limit) {
            startMs = Math.min(startMs, other.startMs);
            endMs = Math.max(endMs, other.endMs);
            nEvents += other.nEvents;
            for (int i = 0; i < byType.length; i++) {
                byType[i] += other.byType[i];
            }
            revenueCents += other.revenueCents;
            if (other.outcomeMs >= 0 && (outcomeMs < 0 || other.outcomeMs < outcomeMs)) {
                outcomeMs = other.outcomeMs;
            }
            lastAddMs = Math.max(lastAddMs, other.lastAddMs);
            consentPKey = Math.max(consentPKey, other.consentPKey);
            consentMKey = Math.max(consentMKey, other.consentMKey);
            nMoves = mergeList(moves, nMoves, other.moves, other.nMoves, limit);
            nCategories = mergeList(categories, nCategories, other.categories, other.nCategories, limit);
            nViewed = mergeList(viewed, nViewed, other.viewed, other.nViewed, limit);
            for (Map.Entry<String, long[]> e : other.cart.entrySet()) {
                long[] c = cart.get(e.getKey());
                long[] o = e.getValue();
                if (c == null) {
                    if (cart.size() < limit) {
                        cart.put(e.getKey(), o.clone());
                    }
                    continue;
                }
                c[0] += o[0];
                c[1] += o[1];
                if (o[2] > c[2] || (o[2] == c[2] && o[3] > c[3])) {
                    c[2] = o[2];
                    c[3] = o[3];
                }
            }
            for (Map.Entry<String, long[]> e : other.categoryCounts.entrySet()) {
                if (categoryCounts.containsKey(e.getKey()) || categoryCounts.size() < limit) {
                    categoryCounts.computeIfAbsent(e.getKey(), k -> new long[1])[0] += e.getValue()[0];
                }
            }
            for (String p : other.products.keySet()) {
                if (products.size() < limit) {
                    products.put(p, Boolean.TRUE);
                }
            }
        }

        /** The SESSION_COLUMNS of operators/sessions.py joined by the column separator. */
        public String packed(String userId, long epoch) {
            StringBuilder out = new StringBuilder(64 + moves.length() + categories.length() + viewed.length());
            out.append(userId).append(COLUMN_SEP).append(startMs).append(COLUMN_SEP).append(endMs)
                    .append(COLUMN_SEP).append(nEvents)
                    .append(COLUMN_SEP).append(byType[PAGE_VIEW]).append(COLUMN_SEP).append(byType[PRODUCT_VIEW])
                    .append(COLUMN_SEP).append(byType[SEARCH]).append(COLUMN_SEP).append(byType[ADD])
                    .append(COLUMN_SEP).append(byType[REMOVE]).append(COLUMN_SEP).append(byType[CHECKOUT])
                    .append(COLUMN_SEP).append(byType[PURCHASE]).append(COLUMN_SEP).append(revenueCents)
                    .append(COLUMN_SEP).append(outcomeMs >= 0 ? Long.toString(outcomeMs) : "")
                    .append(COLUMN_SEP).append(moves).append(COLUMN_SEP).append(categories)
                    .append(COLUMN_SEP).append(viewed)
                    .append(COLUMN_SEP).append(consentPKey % 2 == 1 ? '1' : '0')
                    .append(COLUMN_SEP).append(consentMKey % 2 == 1 ? '1' : '0')
                    .append(COLUMN_SEP).append(epoch);
            doubles(out.append(COLUMN_SEP), propensityFeatures);
            doubles(out.append(COLUMN_SEP), segmentFeatures);
            String trigger = Abandonment.prefix(userId, startMs, endMs, byType[PURCHASE], consentMKey % 2 == 1, moves);
            return out.append(COLUMN_SEP).append(trigger == null ? "" : trigger).toString();
        }

        /**
         * Doubles as base64 of their IEEE bytes, little-endian (numpy's frombuffer reads them
         * back exactly, at a fraction of parsing their text); nothing when null.
         */
        private static void doubles(StringBuilder out, double[] values) {
            if (values == null) {
                return;
            }
            java.nio.ByteBuffer bytes = java.nio.ByteBuffer.allocate(8 * values.length)
                    .order(java.nio.ByteOrder.LITTLE_ENDIAN);
            for (double v : values) {
                bytes.putDouble(v);
            }
            out.append(java.util.Base64.getEncoder().encodeToString(bytes.array()));
        }

        void write(StateBytes.Writer out) {
            out.i64(startMs).i64(endMs).i64(nEvents).i64(revenueCents).i64(outcomeMs).i64(lastAddMs);
            for (long n : byType) {
                out.i64(n);
            }
            out.i64(consentPKey).i64(consentMKey);
            out.i32(nMoves).str(moves).i32(nCategories).str(categories).i32(nViewed).str(viewed);
            out.i32(cart.size());
            for (Map.Entry<String, long[]> e : cart.entrySet()) {
                out.str(e.getKey());
                for (long v : e.getValue()) {
                    out.i64(v);
                }
            }
            out.i32(categoryCounts.size());
            for (Map.Entry<String, long[]> e : categoryCounts.entrySet()) {
                out.str(e.getKey()).i64(e.getValue()[0]);
            }
            out.i32(products.size());
            for (String p : products.keySet()) {
                out.str(p);
            }
        }

        static Session read(StateBytes.Reader in) {
            Session s = new Session();
            s.startMs = in.i64();
            s.endMs = in.i64();
            s.nEvents = in.i64();
            s.revenueCents = in.i64();
            s.outcomeMs = in.i64();
            s.lastAddMs = in.i64();
            for (int i = 0; i < s.byType.length; i++) {
                s.byType[i] = in.i64();
            }
            s.consentPKey = in.i64();
            s.consentMKey = in.i64();
            s.nMoves = in.i32();
            s.moves.append(in.str());
            s.nCategories = in.i32();
            s.categories.append(in.str());
            s.nViewed = in.i32();
            s.viewed.append(in.str());
            for (int i = 0, n = in.i32(); i < n; i++) {
                String k = in.str();
                s.cart.put(k, new long[] {in.i64(), in.i64(), in.i64(), in.i64()});
            }
            for (int i = 0, n = in.i32(); i < n; i++) {
                String k = in.str();
                s.categoryCounts.put(k, new long[] {in.i64()});
            }
            for (int i = 0, n = in.i32(); i < n; i++) {
                s.products.put(in.str(), Boolean.TRUE);
            }
            return s;
        }
    }

    // ---------------------------------------------------------------- per event

    /**
     * Apply one on-time event. Returns false (and changes nothing) for an event of state an
     * erasure of the user superseded (an older epoch than the state's).
     */
    public boolean apply(Event e, long gapMs, long slideMs, int slices, int limit) {
        return apply(e, gapMs, slideMs, slices, limit, 0);
    }

    /**
     * Apply one on-time event; a user whose newest event is {@code ttlMs} or more older (event
     * time; 0: never) comes back as a new one, as if the state had expired meanwhile.
     */
    public boolean apply(Event e, long gapMs, long slideMs, int slices, int limit, long ttlMs) {
        if (e.epoch() < epoch) {
            return false;
        }
        if (ttlMs > 0 && newestMs != Long.MIN_VALUE && e.timeMs() - newestMs >= ttlMs) {
            long keepNewest = newestMs, keepChanges = changes;
            reset();
            newestMs = keepNewest; // the version keeps growing
            changes = keepChanges;
        }
        if (e.epoch() > epoch) { // the user was forgotten: nothing of before carries over
            long keepNewest = newestMs, keepChanges = changes;
            reset();
            epoch = e.epoch();
            newestMs = keepNewest; // the version keeps growing: a reader never sees it go back
            changes = keepChanges;
        }
        userId = e.userId();
        int type = e.typeIndex();
        if (e.timeMs() > newestMs) {
            newestMs = e.timeMs();
            changes = 0;
        } else {
            changes++;
        }
        consentKey = Math.max(consentKey, e.timeMs() * 2 + (e.consentPersonalization() ? 1 : 0));
        if (e.consentPersonalization()) {
            nEvents++;
            if (type >= 0) {
                byType[type]++;
            }
            if (type == PURCHASE && e.quantity() != null) {
                revenueCents += (e.priceCents() == null ? 0 : e.priceCents()) * e.quantity();
            }
            if (type == PURCHASE && e.productId() != null && !e.productId().isEmpty()) {
                bought(e.productId(), e.timeMs());
            }
            firstSeenMs = Math.min(firstSeenMs, e.timeMs());
            lastSeenMs = Math.max(lastSeenMs, e.timeMs());
            byHour[(int) ((e.timeMs() / 3_600_000L) % 24)]++;
        }
        recent(e, slideMs, slices);
        session(e, type, gapMs, limit);
        return true;
    }

    /** Remember a product bought at {@code timeMs}: the newest BOUGHT_KEPT distinct ones stay. */
    void bought(String productId, long timeMs) {
        int at = boughtIds.indexOf(productId);
        if (at >= 0) {
            if (boughtMs.get(at) >= timeMs) {
                return; // bought again earlier than the purchase it already lists
            }
            boughtIds.remove(at);
            boughtMs.remove(at);
        }
        int i = 0;
        while (i < boughtIds.size() && (boughtMs.get(i) > timeMs
                || (boughtMs.get(i) == timeMs && boughtIds.get(i).compareTo(productId) < 0))) {
            i++;
        }
        if (i >= BOUGHT_KEPT) {
            return;
        }
        boughtIds.add(i, productId);
        boughtMs.add(i, timeMs);
        if (boughtIds.size() > BOUGHT_KEPT) {
            boughtIds.remove(BOUGHT_KEPT);
            boughtMs.remove(BOUGHT_KEPT);
        }
    }

    /** The products bought, newest first, as a JSON array of ids (null: none). */
    public String boughtJson() {
        if (boughtIds.isEmpty()) {
            return null;
        }
        StringBuilder out = new StringBuilder("[");
        for (int i = 0; i < boughtIds.size(); i++) {
            if (i > 0) {
                out.append(',');
            }
            Json.string(out, boughtIds.get(i));
        }
        return out.append(']').toString();
    }

    private void recent(Event e, long slideMs, int slices) {
        if (sliceIndex.length != slices) { // first use (or another slice count: start over)
            sliceIndex = new long[slices];
            java.util.Arrays.fill(sliceIndex, Long.MIN_VALUE);
            sliceEvents = new long[slices];
            sliceViews = new long[slices];
        }
        if (!e.consentPersonalization()) {
            return;
        }
        long index = Math.floorDiv(e.timeMs(), slideMs);
        int at = (int) Math.floorMod(index, (long) slices);
        if (sliceIndex[at] > index) {
            return; // older than every slice the window still holds
        }
        if (sliceIndex[at] < index) {
            sliceIndex[at] = index;
            sliceEvents[at] = 0;
            sliceViews[at] = 0;
        }
        sliceEvents[at]++;
        if ("product_view".equals(e.type())) {
            sliceViews[at]++;
        }
    }

    /** The end of the recent window: the slice boundary after the user's newest event. */
    public long recentWindowEndMs(long slideMs) {
        return (Math.floorDiv(newestMs, slideMs) + 1) * slideMs;
    }

    /** Consented events and product views in the {@code slices} slices up to the window end. */
    public long[] recentCounts(long slideMs) {
        long newestIndex = Math.floorDiv(newestMs, slideMs);
        long events = 0, views = 0;
        for (int i = 0; i < sliceIndex.length; i++) {
            if (sliceIndex[i] > newestIndex - sliceIndex.length && sliceIndex[i] <= newestIndex) {
                events += sliceEvents[i];
                views += sliceViews[i];
            }
        }
        return new long[] {events, views};
    }

    private void session(Event e, int type, long gapMs, int limit) {
        // every open session within the gap of the event joins it (usually one, the newest)
        Session into = null;
        for (int i = 0; i < open.size(); i++) {
            Session s = open.get(i);
            if (within(s, e.timeMs(), gapMs)) {
                if (into == null) {
                    into = s;
                } else {
                    into.merge(s, limit);
                    open.remove(i--);
                }
            }
        }
        if (into == null) {
            into = new Session();
            int at = 0;
            while (at < open.size() && open.get(at).startMs < e.timeMs()) {
                at++;
            }
            open.add(at, into);
        }
        into.add(e, type, limit);
    }

    private static boolean within(Session s, long t, long gapMs) {
        return t > s.startMs - gapMs && t < s.endMs + gapMs;
    }

    /** The session in progress: the open session with the newest event (null: none). */
    public Session current() {
        Session newest = null;
        for (Session s : open) {
            if (newest == null || s.endMs >= newest.endMs) {
                newest = s;
            }
        }
        return newest;
    }

    /** The earliest time a close is due (the watermark at which it closes), or -1 with none open. */
    public long nextCloseMs(long gapMs) {
        long next = -1;
        for (Session s : open) {
            long due = s.endMs + gapMs - 1;
            next = next < 0 ? due : Math.min(next, due);
        }
        return next;
    }

    /**
     * The session timer to register now, or -1 for none: sessions close on one pending timer
     * at or before the earliest close, moved only when a new session would close before it
     * ({@code firedAt}: the time of a timer firing now, else Long.MIN_VALUE). A session
     * extended by an event keeps its timer; when that timer fires early, the next one is set
     * at the session's close then. Timers fire in time order, so sessions still close in
     * close-time order across users, with one timer operation a session instead of two an event.
     */
    public long sessionTimerToSet(long gapMs, long firedAt) {
        if (sessionTimerMs >= 0 && sessionTimerMs <= firedAt) {
            sessionTimerMs = -1; // this one (or an earlier one) fired
        }
        long next = nextCloseMs(gapMs);
        if (next < 0 || (sessionTimerMs >= 0 && sessionTimerMs <= next)) {
            return -1;
        }
        sessionTimerMs = next;
        return next;
    }

    /** Remove and return the sessions whose close is due at the watermark, oldest first. */
    public List<Session> closeDue(long watermark, long gapMs) {
        List<Session> closed = new ArrayList<>();
        for (int i = 0; i < open.size(); i++) {
            if (open.get(i).endMs + gapMs - 1 <= watermark) {
                closed.add(open.remove(i--));
            }
        }
        if (!closed.isEmpty()) {
            changes++;
        }
        for (Session s : closed) {
            if (s.consentPKey % 2 == 1) { // the models keep only consented sessions in a user's history
                // the models' features, here where the history is (the models step reads them from the row)
                Long beforeEndMs = histLastEndMs >= 0 ? histLastEndMs : null;
                s.propensityFeatures = Features.propensity(s, history());
                histSessions++;
                histPurchaseSessions += s.byType[PURCHASE] > 0 ? 1 : 0;
                histRevenueCents += s.revenueCents;
                histLastEndMs = s.endMs;
                s.segmentFeatures = Features.segment(s, histSessions, histRevenueCents, beforeEndMs);
            }
        }
        return closed;
    }

    /** The history of closed sessions the propensity's features read. */
    public Features.History history() {
        return new Features.History(histSessions, histPurchaseSessions, histRevenueCents,
                histLastEndMs >= 0 ? histLastEndMs : null);
    }

    private void reset() {
        nEvents = 0;
        java.util.Arrays.fill(byType, 0);
        revenueCents = 0;
        firstSeenMs = Long.MAX_VALUE;
        lastSeenMs = Long.MIN_VALUE;
        java.util.Arrays.fill(byHour, 0);
        consentKey = -1;
        sliceIndex = new long[0];
        sliceEvents = new long[0];
        sliceViews = new long[0];
        open.clear();
        histSessions = 0;
        histPurchaseSessions = 0;
        histRevenueCents = 0;
        histLastEndMs = -1;
        boughtIds.clear();
        boughtMs.clear();
    }

    // ---------------------------------------------------------------- fields read by the function

    public long nEvents() {
        return nEvents;
    }

    public long count(int type) {
        return byType[type];
    }

    public long revenueCents() {
        return revenueCents;
    }

    public Long firstSeenMs() {
        return nEvents > 0 ? firstSeenMs : null;
    }

    public Long lastSeenMs() {
        return nEvents > 0 ? lastSeenMs : null;
    }

    /** Events per hour of day (UTC), 24 counts joined by commas. */
    public String eventsByHour() {
        StringBuilder out = new StringBuilder();
        for (int h = 0; h < 24; h++) {
            if (h > 0) {
                out.append(',');
            }
            out.append(byHour[h]);
        }
        return out.toString();
    }

    /** The busiest hours of day (UTC), most events first, ties to the earlier hour, joined by commas. */
    public String activeHours(int top) {
        StringBuilder out = new StringBuilder();
        boolean[] taken = new boolean[24];
        for (int k = 0; k < top; k++) {
            int best = -1;
            for (int h = 0; h < 24; h++) {
                if (!taken[h] && byHour[h] > 0 && (best < 0 || byHour[h] > byHour[best])) {
                    best = h;
                }
            }
            if (best < 0) {
                break;
            }
            taken[best] = true;
            if (k > 0) {
                out.append(',');
            }
            out.append(best);
        }
        return out.toString();
    }

    // ---------------------------------------------------------------- state bytes

    public byte[] toBytes() {
        StateBytes.Writer out = new StateBytes.Writer(512);
        out.u8(FORMAT).str(userId).i64(epoch).i64(newestMs).i64(changes).i64(expiryTimerMs).i64(nEvents);
        for (long n : byType) {
            out.i64(n);
        }
        out.i64(revenueCents).i64(firstSeenMs).i64(lastSeenMs);
        for (long n : byHour) {
            out.i64(n);
        }
        out.i64(consentKey);
        out.i32(sliceIndex.length);
        for (int i = 0; i < sliceIndex.length; i++) {
            out.i64(sliceIndex[i]).i64(sliceEvents[i]).i64(sliceViews[i]);
        }
        out.i32(open.size());
        for (Session s : open) {
            s.write(out);
        }
        out.i64(histSessions).i64(histPurchaseSessions).i64(histRevenueCents).i64(histLastEndMs);
        out.i64(sessionTimerMs);
        out.i32(boughtIds.size());
        for (int i = 0; i < boughtIds.size(); i++) {
            out.i64(boughtMs.get(i)).str(boughtIds.get(i));
        }
        return out.bytes();
    }

    public static UserState fromBytes(byte[] data) {
        UserState u = new UserState();
        if (data == null || data.length == 0) {
            return u;
        }
        StateBytes.Reader in = new StateBytes.Reader(data);
        int format = in.u8();
        if (format < 1 || format > FORMAT) {
            throw new IllegalStateException("user state of format " + format + ", this release reads 1 to " + FORMAT);
        }
        u.userId = in.str();
        u.epoch = in.i64();
        u.newestMs = in.i64();
        u.changes = in.i64();
        u.expiryTimerMs = in.i64();
        u.nEvents = in.i64();
        for (int i = 0; i < u.byType.length; i++) {
            u.byType[i] = in.i64();
        }
        u.revenueCents = in.i64();
        u.firstSeenMs = in.i64();
        u.lastSeenMs = in.i64();
        for (int i = 0; i < 24; i++) {
            u.byHour[i] = in.i64();
        }
        u.consentKey = in.i64();
        int slices = in.i32();
        u.sliceIndex = new long[slices];
        u.sliceEvents = new long[slices];
        u.sliceViews = new long[slices];
        for (int i = 0; i < slices; i++) {
            u.sliceIndex[i] = in.i64();
            u.sliceEvents[i] = in.i64();
            u.sliceViews[i] = in.i64();
        }
        for (int i = 0, n = in.i32(); i < n; i++) {
            u.open.add(Session.read(in));
        }
        u.histSessions = in.i64();
        u.histPurchaseSessions = in.i64();
        u.histRevenueCents = in.i64();
        u.histLastEndMs = in.i64();
        // format 1 (an earlier release) kept a timer at every open session's close time instead:
        // they fire as before, and the next event or close sets this one
        u.sessionTimerMs = format >= 2 ? in.i64() : -1;
        if (format >= 3) {
            for (int i = 0, n = in.i32(); i < n; i++) {
                u.boughtMs.add(in.i64());
                u.boughtIds.add(in.str());
            }
        }
        return u;
    }

    // ---------------------------------------------------------------- helpers

    private static String nz(String s) {
        return s == null ? "" : s;
    }

    /** CONCAT_WS(FIELD_SEP, ...): the non-null parts joined. */
    private static String concatWs(String... parts) {
        StringBuilder out = new StringBuilder();
        boolean first = true;
        for (String p : parts) {
            if (p == null) {
                continue;
            }
            if (!first) {
                out.append(FIELD_SEP);
            }
            out.append(p);
            first = false;
        }
        return out.toString();
    }

    private static void item(StringBuilder list, int count, String item) {
        if (count > 0) {
            list.append(ITEM_SEP);
        }
        list.append(item);
    }

    private static int mergeList(StringBuilder list, int count, StringBuilder other, int otherCount, int limit) {
        if (otherCount == 0 || count >= limit) {
            return count;
        }
        int take = Math.min(otherCount, limit - count);
        String text = other.toString();
        if (take < otherCount) {
            int end = 0;
            for (int i = 0, from = 0; i < take; i++, from = end + 1) {
                end = text.indexOf(ITEM_SEP, from);
            }
            text = text.substring(0, end);
        }
        if (count > 0) {
            list.append(ITEM_SEP);
        }
        list.append(text);
        return count + take;
    }
}
