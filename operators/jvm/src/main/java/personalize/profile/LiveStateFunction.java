package personalize.profile;

import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.streaming.api.TimerService;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.table.data.GenericRowData;
import org.apache.flink.table.data.RowData;
import org.apache.flink.table.data.StringData;
import org.apache.flink.util.Collector;

/**
 * Each user's whole live state ({@link UserState}) in one keyed JVM operator, updated per event
 * (wired between the job's SQL and the DataStream API by {@link LiveState}).
 *
 * <p>The job's events come in as internal rows of its events view, keyed by user id. Two kinds
 * of rows go out, the user id then the columns of {@link #OUTPUT}: {@code live}, the user's
 * profile fields after every change (an event, or a session closing; a bounded run emits them at
 * session closes only), with a per-user {@code version} that only grows; and {@code closed},
 * one per closed session, its columns packed in one string for the models' Python step
 * ({@code operators/sessions.py}).
 *
 * <p>Sessions close on event-time timers at their close time (the last event + gap - 1), so
 * they close in close-time order across users even when one watermark step passes several. A
 * user has one session timer, at or before its open sessions' earliest close: an event that
 * extends the session leaves it, and when it fires early the next is set at the close then
 * ({@link UserState#sessionTimerToSet}; moving the timer per event cost more than the state
 * change itself). Events at or behind the watermark are dropped before they change anything
 * (the job's late split has sent them to the dead-letter topic already).
 *
 * <p>The state is the {@link UserState} object itself ({@link UserStateSerializer}): the heap
 * backend keeps it and the function changes it in place, so an event costs no decoding and
 * encoding of the state (the Java process table function this replaces kept it as bytes,
 * read and written whole per event, behind conversions of every row: about 10 us an event
 * against 1-2 here, scripts/bench_windows.py).
 */
public final class LiveStateFunction extends KeyedProcessFunction<String, RowData, RowData> {
    private static final long serialVersionUID = 1L;
    /** the columns of every change, after the user id */
    public static final String OUTPUT =
        "ROW<kind STRING, version BIGINT, epoch BIGINT, consent BOOLEAN, consent_ms BIGINT, "
                + "n_events BIGINT, n_page_view BIGINT, n_product_view BIGINT, n_add_to_cart BIGINT, "
                + "n_remove_from_cart BIGINT, n_checkout BIGINT, n_purchase BIGINT, n_search BIGINT, "
                + "revenue_cents BIGINT, first_seen_ms BIGINT, last_seen_ms BIGINT, events_by_hour STRING, "
                + "recent_events BIGINT, recent_product_views BIGINT, recent_window_end_ms BIGINT, "
                + "session_start_ms BIGINT, session_events BIGINT, session_product_views BIGINT, "
                + "session_products BIGINT, session_cart STRING, session_cart_value STRING, "
                + "session_last_cart_add_ms BIGINT, session_top_category STRING, session_propensity STRING, "
                + "revenue STRING, updated_ms BIGINT, active_hours STRING, purchased_products STRING, session STRING>";
    public static final String LIVE = "live";
    public static final String CLOSED = "closed";
    private static final StringData LIVE_KIND = StringData.fromString(LIVE);
    private static final StringData CLOSED_KIND = StringData.fromString(CLOSED);
    /** the output row's width: the user id, then the columns of OUTPUT */
    public static final int WIDTH = 35;

    /** where the function reads an event's fields in its input row */
    public record Fields(int userId, int type, int product, int category, int price, int quantity,
                         int consentPersonalization, int consentMarketing, int timeMs, int epoch)
            implements java.io.Serializable {
    }

    private final Fields in;
    private final long gapMs;
    private final long slideMs;
    private final int slices;
    private final int limit;
    private final long ttlMs;
    private final boolean everyChange;
    private final String snapshotsTopic;
    private final Map<String, String> kafka;
    private transient ValueState<UserState> state;
    private transient PropensityModel.Registry models;

    public LiveStateFunction(Fields in, long gapMs, long recentWindowMs, long slideMs, int limit, long ttlMs,
                             boolean bounded, String snapshotsTopic, Map<String, String> kafka) {
        if (gapMs < 1 || slideMs < 1 || recentWindowMs < slideMs || recentWindowMs % slideMs != 0) {
            throw new IllegalArgumentException("the live state needs gap >= 1 ms and a window that is a multiple of "
                    + "its slide, got gap " + gapMs + ", window " + recentWindowMs + ", slide " + slideMs);
        }
        this.in = in;
        this.gapMs = gapMs;
        this.slideMs = slideMs;
        this.slices = (int) (recentWindowMs / slideMs);
        this.limit = limit;
        this.ttlMs = ttlMs;
        this.everyChange = !bounded;
        this.snapshotsTopic = snapshotsTopic;
        this.kafka = Map.copyOf(kafka);
    }

    @Override
    public void open(OpenContext context) {
        state = getRuntimeContext().getState(new ValueStateDescriptor<>("user", UserStateSerializer.INSTANCE));
        models = PropensityModel.open(snapshotsTopic, kafka);
    }

    @Override
    public void close() {
        if (models != null) {
            PropensityModel.release(models);
            models = null;
        }
    }

    @Override
    public void processElement(RowData row, Context ctx, Collector<RowData> out) throws Exception {
        TimerService timers = ctx.timerService();
        Long rowtime = ctx.timestamp();
        if (rowtime != null && rowtime <= timers.currentWatermark()) {
            return; // late: the job's late split has sent it to the dead letters
        }
        UserState user = state.value();
        if (user == null) {
            user = new UserState();
        }
        UserState.Event e = new UserState.Event(
                ctx.getCurrentKey(), string(row, in.type()), string(row, in.product()),
                string(row, in.category()), row.isNullAt(in.price()) ? null : row.getLong(in.price()),
                row.isNullAt(in.quantity()) ? null : row.getInt(in.quantity()),
                !row.isNullAt(in.consentPersonalization()) && row.getBoolean(in.consentPersonalization()),
                !row.isNullAt(in.consentMarketing()) && row.getBoolean(in.consentMarketing()),
                row.getLong(in.timeMs()), row.getLong(in.epoch()));
        if (!user.apply(e, gapMs, slideMs, slices, limit, ttlMs)) {
            return; // of state an erasure superseded
        }
        if (everyChange) {
            out.collect(live(ctx.getCurrentKey(), user));
        }
        long sessionTimer = user.sessionTimerToSet(gapMs, Long.MIN_VALUE);
        if (sessionTimer >= 0) {
            timers.registerEventTimeTimer(sessionTimer);
        }
        if (ttlMs > 0 && user.expiryTimerMs < 0) {
            user.expiryTimerMs = user.newestMs + ttlMs;
            timers.registerEventTimeTimer(user.expiryTimerMs);
        }
        state.update(user);
    }

    @Override
    public void onTimer(long at, OnTimerContext ctx, Collector<RowData> out) throws Exception {
        UserState user = state.value();
        if (user == null) {
            return; // a timer of state that expired
        }
        TimerService timers = ctx.timerService();
        long watermark = timers.currentWatermark();
        boolean expiry = at == user.expiryTimerMs;
        boolean expired = expiry && user.newestMs + ttlMs <= Math.max(at, watermark);
        if (expired && user.sessionTimerMs >= 0 && user.sessionTimerMs != at) {
            timers.deleteEventTimeTimer(user.sessionTimerMs);
        }
        String key = ctx.getCurrentKey();
        List<UserState.Session> closed = user.closeDue(expired ? Long.MAX_VALUE : at, gapMs);
        for (UserState.Session session : closed) {
            out.collect(closedRow(key, session.packed(user.userId(), user.epoch()), user.epoch()));
        }
        if (expired) {
            state.clear(); // the profile in Redis expires by its own TTL
            return;
        }
        if (expiry) {
            user.expiryTimerMs = user.newestMs + ttlMs;
            timers.registerEventTimeTimer(user.expiryTimerMs);
        }
        long timerBefore = user.sessionTimerMs;
        long sessionTimer = user.sessionTimerToSet(gapMs, at);
        if (sessionTimer >= 0) {
            timers.registerEventTimeTimer(sessionTimer);
        }
        if (!closed.isEmpty()) {
            out.collect(live(key, user));
        }
        if (expiry || !closed.isEmpty() || user.sessionTimerMs != timerBefore) {
            state.update(user);
        }
    }

    private static String string(RowData row, int i) {
        return row.isNullAt(i) ? null : row.getString(i).toString();
    }

    private static StringData s(String value) {
        return value == null ? null : StringData.fromString(value);
    }

    private RowData live(String key, UserState u) {
        GenericRowData row = new GenericRowData(WIDTH);
        row.setField(0, StringData.fromString(key));
        row.setField(1, LIVE_KIND);
        row.setField(2, u.version());
        row.setField(3, u.epoch());
        row.setField(4, u.consent());
        row.setField(5, u.consentMs());
        row.setField(6, u.nEvents());
        for (int t = 0; t < UserState.EVENT_TYPES.length; t++) {
            row.setField(7 + t, u.count(t));
        }
        row.setField(14, u.revenueCents());
        row.setField(15, u.firstSeenMs());
        row.setField(16, u.lastSeenMs());
        row.setField(17, s(u.eventsByHour()));
        long[] recent = u.recentCounts(slideMs);
        row.setField(18, recent[0]);
        row.setField(19, recent[1]);
        row.setField(20, u.recentWindowEndMs(slideMs));
        UserState.Session s = u.current();
        if (s != null) {
            row.setField(21, s.startMs());
            row.setField(22, s.nEvents());
            row.setField(23, s.productViews());
            row.setField(24, (long) s.distinctProducts());
            String cart = s.cartJson();
            row.setField(25, s(cart));
            row.setField(26, cart == null ? null : s(Json.cents(s.cartValueCents())));
            row.setField(27, s.lastCartAddMs() >= 0 ? s.lastCartAddMs() : null);
            row.setField(28, s(s.topCategory()));
            PropensityModel model = models == null ? null : models.model();
            if (model != null) {
                row.setField(29, s(sixDecimals(model.score(Features.propensity(s, u.history())))));
            }
        }
        row.setField(30, s(Json.cents(u.revenueCents())));
        row.setField(31, u.lastSeenMs());
        row.setField(32, s(u.activeHours(3)));
        row.setField(33, s(u.boughtJson()));
        return row;
    }

    private static RowData closedRow(String key, String packed, long epoch) {
        GenericRowData row = new GenericRowData(WIDTH);
        row.setField(0, StringData.fromString(key));
        row.setField(1, CLOSED_KIND);
        row.setField(3, epoch);
        row.setField(WIDTH - 1, StringData.fromString(packed));
        return row;
    }

    /** A probability with six decimals, as the models step writes propensity. */
    static String sixDecimals(double p) {
        return new java.math.BigDecimal(p).setScale(6, java.math.RoundingMode.HALF_EVEN).toPlainString();
    }
}
