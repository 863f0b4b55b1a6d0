package personalize.profile;

import java.util.List;
import java.util.Map;

import org.apache.flink.table.annotation.ArgumentHint;
import org.apache.flink.table.annotation.ArgumentTrait;
import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.annotation.FunctionHint;
import org.apache.flink.table.annotation.StateHint;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.ProcessTableFunction;
import org.apache.flink.types.Row;

/**
 * {@code live_profile(input => TABLE events PARTITION BY user_id, on_time => DESCRIPTOR(rowtime))}:
 * one keyed JVM operator holding each user's whole live state ({@link UserState}), updated per
 * event (registered by jobs/profile.py; it replaces the totals GROUP BY, the HOP window and
 * the SESSION window of earlier releases).
 *
 * <p>It emits two kinds of rows: {@code live}, the user's profile fields after every change
 * (an event, or a session closing), with a per-user {@code version} that only grows; and
 * {@code closed}, one per closed session, its columns packed in one string for the models'
 * Python step ({@code operators/sessions.py}). Sessions close on event-time timers when the
 * watermark reaches their last event + gap - 1. Rows at or behind the watermark never reach
 * {@code eval} (Flink 2.2 drops them before it); the job's late split has sent them to the
 * dead-letter topic already.
 */
@FunctionHint(output = @DataTypeHint(
        "ROW<kind STRING, version BIGINT, epoch BIGINT, consent BOOLEAN, consent_ms BIGINT, "
                + "n_events BIGINT, n_page_view BIGINT, n_product_view BIGINT, n_add_to_cart BIGINT, "
                + "n_remove_from_cart BIGINT, n_checkout BIGINT, n_purchase BIGINT, n_search BIGINT, "
                + "revenue_cents BIGINT, first_seen_ms BIGINT, last_seen_ms BIGINT, events_by_hour STRING, "
                + "recent_events BIGINT, recent_product_views BIGINT, recent_window_end_ms BIGINT, "
                + "session_start_ms BIGINT, session_events BIGINT, session_product_views BIGINT, "
                + "session_products BIGINT, session_cart STRING, session_cart_value STRING, "
                + "session_last_cart_add_ms BIGINT, session_top_category STRING, session_propensity STRING, "
                + "revenue STRING, updated_ms BIGINT, active_hours STRING, session STRING>"))
public final class LiveProfile extends ProcessTableFunction<Row> {
    public static final String LIVE = "live";
    public static final String CLOSED = "closed";
    /** the output row's width (the columns of the hint above) */
    static final int WIDTH = 33;

    /** The state: the user's {@link UserState} as bytes, read and written whole per call. */
    public static final class Stored {
        public byte[] data;
    }

    private final long gapMs;
    private final long slideMs;
    private final int slices;
    private final int limit;
    private final long ttlMs;
    /**
     * Unbounded runs emit a live row per change; a bounded run (a backfill, whose sink keeps
     * only each user's newest row until the end anyway) only at each session close: every
     * session closes at the end of input, so each user's last row is its final state.
     */
    private final boolean everyChange;
    private final String snapshotsTopic;
    private final Map<String, String> kafka;
    private transient PropensityModel.Registry models;

    /**
     * Built by jobs/profile.py with the settings: session gap, recent window and slide, list
     * limit, state TTL (0: none), whether the run is bounded, and where the models' snapshots
     * are (topic, Kafka connection properties).
     */
    public LiveProfile(String gapMs, String recentWindowMs, String recentSlideMs, String listLimit,
                       String stateTtlMs, String bounded, String snapshotsTopic, Map<String, String> kafka) {
        this.gapMs = Long.parseLong(gapMs);
        this.slideMs = Long.parseLong(recentSlideMs);
        long window = Long.parseLong(recentWindowMs);
        if (this.gapMs < 1 || this.slideMs < 1 || window < slideMs || window % slideMs != 0) {
            throw new IllegalArgumentException("live_profile needs gap >= 1 ms and a window that is a multiple of "
                    + "its slide, got gap " + gapMs + ", window " + recentWindowMs + ", slide " + recentSlideMs);
        }
        this.slices = (int) (window / slideMs);
        this.limit = Integer.parseInt(listLimit);
        this.ttlMs = Long.parseLong(stateTtlMs);
        this.everyChange = !Boolean.parseBoolean(bounded);
        this.snapshotsTopic = snapshotsTopic;
        this.kafka = Map.copyOf(kafka);
    }

    @Override
    public void open(FunctionContext context) {
        models = PropensityModel.open(snapshotsTopic, kafka);
    }

    @Override
    public void close() {
        if (models != null) {
            PropensityModel.release(models);
            models = null;
        }
    }

    public void eval(Context ctx, @StateHint(name = "user", ttl = "0") Stored stored,
                     @ArgumentHint(value = {ArgumentTrait.SET_SEMANTIC_TABLE, ArgumentTrait.REQUIRE_ON_TIME}, name = "input") Row input) {
        UserState user = UserState.fromBytes(stored.data);
        UserState.Event e = new UserState.Event(
                input.getFieldAs("user_id"), input.getFieldAs("event_type"), input.getFieldAs("product_id"),
                input.getFieldAs("category"), input.getFieldAs("price_cents"), input.getFieldAs("quantity"),
                Boolean.TRUE.equals(input.getField("consent_personalization")),
                Boolean.TRUE.equals(input.getField("consent_marketing")),
                input.<Long>getFieldAs("event_time_ms"), input.<Long>getFieldAs("epoch"));
        long[] before = user.closeTimes(gapMs);
        if (!user.apply(e, gapMs, slideMs, slices, limit, ttlMs)) {
            return; // of state an erasure superseded
        }
        if (everyChange) {
            collect(live(user));
        }
        TimeContext<Long> time = ctx.timeContext(Long.class);
        retime(time, before, user.closeTimes(gapMs));
        if (ttlMs > 0 && user.expiryTimerMs < 0) {
            user.expiryTimerMs = user.newestMs + ttlMs;
            time.registerOnTime(user.expiryTimerMs);
        }
        stored.data = user.toBytes();
    }

    /**
     * A timer per open session, at its close time: each session closes when the watermark
     * reaches it, in close-time order across users, even when one watermark step passes
     * several sessions of a user (a bounded replay's watermark lags hours behind its reads).
     * One more timer per user expires the state of a user inactive for the state TTL (event
     * time; Flink's own TTL cleanup of heap state cost a quarter of the function's time): at
     * its time the state goes, or the timer moves to the newest event + TTL.
     */
    public void onTimer(OnTimerContext ctx, Stored stored) {
        UserState user = UserState.fromBytes(stored.data);
        TimeContext<Long> time = ctx.timeContext(Long.class);
        long at = time.time();
        Long watermark = time.currentWatermark();
        boolean expiry = at == user.expiryTimerMs;
        boolean expired = expiry && user.newestMs + ttlMs <= Math.max(at, watermark == null ? at : watermark);
        if (expired) {
            retime(time, user.closeTimes(gapMs), new long[0]); // (clearAll visits every key's timers)
        }
        List<UserState.Session> closed = user.closeDue(expired ? Long.MAX_VALUE : at, gapMs);
        for (UserState.Session session : closed) {
            collect(closedRow(session.packed(user.userId(), user.epoch()), user.epoch()));
        }
        if (expired) {
            ctx.clearAllState(); // the profile in Redis expires by its own TTL
            return;
        }
        if (expiry) {
            user.expiryTimerMs = user.newestMs + ttlMs;
            time.registerOnTime(user.expiryTimerMs);
        }
        if (!closed.isEmpty()) {
            collect(live(user));
        }
        if (expiry || !closed.isEmpty()) {
            stored.data = user.toBytes();
        }
    }

    /** Timers follow the open sessions' close times: stale ones deleted, new ones set. */
    private static void retime(TimeContext<Long> time, long[] before, long[] after) {
        for (long t : before) {
            if (!contains(after, t)) {
                time.clearTimer(t);
            }
        }
        for (long t : after) {
            if (!contains(before, t)) {
                time.registerOnTime(t);
            }
        }
    }

    private static boolean contains(long[] times, long t) {
        for (long x : times) {
            if (x == t) {
                return true;
            }
        }
        return false;
    }

    private Row live(UserState u) {
        Row row = new Row(WIDTH);
        row.setField(0, LIVE);
        row.setField(1, u.version());
        row.setField(2, u.epoch());
        row.setField(3, u.consent());
        row.setField(4, u.consentMs());
        row.setField(5, u.nEvents());
        for (int t = 0; t < UserState.EVENT_TYPES.length; t++) {
            row.setField(6 + t, u.count(t));
        }
        row.setField(13, u.revenueCents());
        row.setField(14, u.firstSeenMs());
        row.setField(15, u.lastSeenMs());
        row.setField(16, u.eventsByHour());
        long[] recent = u.recentCounts(slideMs);
        row.setField(17, recent[0]);
        row.setField(18, recent[1]);
        row.setField(19, u.recentWindowEndMs(slideMs));
        UserState.Session s = u.current();
        if (s != null) {
            row.setField(20, s.startMs());
            row.setField(21, s.nEvents());
            row.setField(22, s.productViews());
            row.setField(23, (long) s.distinctProducts());
            String cart = s.cartJson();
            row.setField(24, cart);
            row.setField(25, cart == null ? null : Json.cents(s.cartValueCents()));
            row.setField(26, s.lastCartAddMs() >= 0 ? s.lastCartAddMs() : null);
            row.setField(27, s.topCategory());
            PropensityModel model = models == null ? null : models.model();
            if (model != null) {
                row.setField(28, sixDecimals(model.score(Features.propensity(s, u.history()))));
            }
        }
        // what the profile shows derived, as text: the loader writes the row as it comes
        row.setField(29, Json.cents(u.revenueCents()));
        row.setField(30, u.lastSeenMs()); // the profile's updated_ms: event time, the same in a replay
        row.setField(31, u.activeHours(3));
        return row;
    }

    /** A probability with six decimals, as the models step writes propensity. */
    static String sixDecimals(double p) {
        return new java.math.BigDecimal(p).setScale(6, java.math.RoundingMode.HALF_EVEN).toPlainString();
    }

    private static Row closedRow(String packed, long epoch) {
        Row row = new Row(WIDTH);
        row.setField(0, CLOSED);
        row.setField(2, epoch);
        row.setField(WIDTH - 1, packed);
        return row;
    }
}
