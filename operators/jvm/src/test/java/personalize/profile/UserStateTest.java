package personalize.profile;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.List;

import org.junit.jupiter.api.Test;

/** What one user's live state holds after each event and each close (pure logic, no Flink). */
class UserStateTest {
    static final long GAP = 30 * 60_000L, SLIDE = 5 * 60_000L;
    static final int SLICES = 6, LIMIT = 1000;
    static final long T0 = 1_700_000_000_000L - 1_700_000_000_000L % SLIDE; // a slice boundary

    static UserState.Event ev(String type, long t) {
        return ev(type, t, true, "p1", "shoes", 1999L, 1);
    }

    static UserState.Event ev(String type, long t, boolean consent, String product, String category, Long cents,
                              Integer quantity) {
        return new UserState.Event("u1", type, product, category, cents, quantity, consent, true, t, 0);
    }

    /** A packed row's features: base64 of little-endian doubles. */
    static double[] doubles(String base64) {
        java.nio.DoubleBuffer in = java.nio.ByteBuffer.wrap(java.util.Base64.getDecoder().decode(base64))
                .order(java.nio.ByteOrder.LITTLE_ENDIAN).asDoubleBuffer();
        double[] out = new double[in.remaining()];
        in.get(out);
        return out;
    }

    static UserState run(UserState.Event... events) {
        UserState u = new UserState();
        for (UserState.Event e : events) {
            assertTrue(u.apply(e, GAP, SLIDE, SLICES, LIMIT));
            u = UserState.fromBytes(u.toBytes()); // as the function holds it: bytes between calls
        }
        return u;
    }

    @Test
    void totalsCountOnlyConsentedEventsAndTheNewestEventDecidesConsent() {
        UserState u = run(ev("product_view", T0), ev("purchase", T0 + 1000, true, "p1", "shoes", 1999L, 3),
                ev("page_view", T0 + 2000, false, null, null, null, 1));
        assertEquals(2, u.nEvents());
        assertEquals(1, u.count(UserState.PRODUCT_VIEW));
        assertEquals(1, u.count(UserState.PURCHASE));
        assertEquals(0, u.count(UserState.PAGE_VIEW));
        assertEquals(3 * 1999, u.revenueCents());
        assertEquals(T0, u.firstSeenMs());
        assertEquals(T0 + 1000, u.lastSeenMs());
        assertFalse(u.consent());
        assertEquals(T0 + 2000, u.consentMs());
        long hour = (T0 / 3_600_000L) % 24;
        assertEquals(2, Long.parseLong(u.eventsByHour().split(",")[(int) hour]));
        // consent again later: the flag follows the newest event, even one that arrives out of order
        UserState back = run(ev("page_view", T0 + 5000), ev("page_view", T0 + 3000, false, null, null, null, 1));
        assertTrue(back.consent());
    }

    @Test
    void activeHoursAreTheBusiestHoursMostEventsFirstTiesToTheEarlierHour() {
        long day = T0 - T0 % 86_400_000L;
        long h = 3_600_000L;
        UserState u = run(ev("page_view", day + 9 * h), ev("page_view", day + 22 * h), ev("page_view", day + 5 * h),
                ev("page_view", day + 22 * h + 1), ev("page_view", day + 9 * h + 1), ev("page_view", day + 14 * h));
        assertEquals("9,22,5", u.activeHours(3)); // 9 and 22 twice (9 earlier), then 5 before 14
        assertEquals("", new UserState().activeHours(3));
        assertEquals("9", u.activeHours(1));
    }

    @Test
    void recentCountsTheSlicesOfTheWindowEndingAtTheSliceBoundaryAfterTheNewestEvent() {
        UserState u = run(ev("product_view", T0 - 31 * 60_000L), ev("product_view", T0 - 25 * 60_000L),
                ev("page_view", T0 - 60_000L), ev("product_view", T0 + 10));
        // window [T0 + SLIDE - 30 min, T0 + SLIDE): the event 31 min before is out, 25 min before is in
        assertEquals(T0 + SLIDE, u.recentWindowEndMs(SLIDE));
        assertArrayEquals(new long[] {3, 2}, u.recentCounts(SLIDE));
        // an hour later only the newest event's slice counts
        UserState later = run(ev("product_view", T0), ev("page_view", T0 + 3_600_000L));
        assertArrayEquals(new long[] {1, 0}, later.recentCounts(SLIDE));
        // an event older than the window counts in the totals, not in recent
        UserState old = run(ev("page_view", T0 + 3_600_000L), ev("product_view", T0));
        assertArrayEquals(new long[] {1, 0}, old.recentCounts(SLIDE));
        assertEquals(2, old.nEvents());
    }

    @Test
    void aSessionClosesWhenTheWatermarkReachesItsLastEventPlusTheGapMinusOne() {
        UserState u = run(ev("page_view", T0), ev("add_to_cart", T0 + 60_000, true, "p9", "bags", 500L, 2));
        assertEquals(T0 + 60_000 + GAP - 1, u.nextCloseMs(GAP));
        assertTrue(u.closeDue(T0 + 60_000 + GAP - 2, GAP).isEmpty());
        List<UserState.Session> closed = u.closeDue(T0 + 60_000 + GAP - 1, GAP);
        assertEquals(1, closed.size());
        assertNull(u.current());
        assertEquals(-1, u.nextCloseMs(GAP));
        String[] cols = closed.get(0).packed("u1", 0).split("\u001d", -1);
        assertEquals(22, cols.length);
        assertEquals("u1", cols[0]);
        assertEquals(Long.toString(T0), cols[1]);
        assertEquals(Long.toString(T0 + 60_000), cols[2]);
        assertEquals("2", cols[3]); // events
        assertEquals("1", cols[4]); // page views
        assertEquals("1", cols[7]); // cart adds
        assertEquals("", cols[12]); // no checkout or purchase
        assertEquals("+\u001fp9\u001f2\u001f500\u001f" + (T0 + 60_000), cols[13]);
        assertEquals("shoes\u001ebags", cols[14]);
        assertEquals("", cols[15]); // no product views
        assertEquals("1", cols[16]);
        assertEquals("1", cols[17]);
        assertEquals("0", cols[18]);
    }

    @Test
    void oneSessionTimerStaysAtOrBeforeTheEarliestCloseAndMovesOnlyWhenItFiresOrAnEarlierSessionOpens() {
        UserState u = new UserState();
        assertTrue(u.apply(ev("page_view", T0), GAP, SLIDE, SLICES, LIMIT));
        assertEquals(T0 + GAP - 1, u.sessionTimerToSet(GAP, Long.MIN_VALUE)); // the first event sets it
        assertTrue(u.apply(ev("page_view", T0 + 60_000), GAP, SLIDE, SLICES, LIMIT));
        assertEquals(-1, u.sessionTimerToSet(GAP, Long.MIN_VALUE)); // the session extended: it stays
        u = UserState.fromBytes(u.toBytes());
        assertEquals(T0 + GAP - 1, u.sessionTimerMs); // in the state bytes
        // an out-of-order event opens a session that closes before it: a timer for that one
        assertTrue(u.apply(ev("page_view", T0 - 2 * GAP), GAP, SLIDE, SLICES, LIMIT));
        assertEquals(T0 - GAP - 1, u.sessionTimerToSet(GAP, Long.MIN_VALUE));
        // it fires: that session closes, the next timer is at the other's close now
        assertEquals(1, u.closeDue(T0 - GAP - 1, GAP).size());
        assertEquals(T0 + 60_000 + GAP - 1, u.sessionTimerToSet(GAP, T0 - GAP - 1));
        // the first timer, still pending, fires early: nothing closes, nothing is set
        assertTrue(u.closeDue(T0 + GAP - 1, GAP).isEmpty());
        assertEquals(-1, u.sessionTimerToSet(GAP, T0 + GAP - 1));
        assertEquals(1, u.closeDue(T0 + 60_000 + GAP - 1, GAP).size());
        assertEquals(-1, u.sessionTimerToSet(GAP, T0 + 60_000 + GAP - 1)); // none open: none
        assertEquals(-1, u.sessionTimerMs);
    }

    @Test
    void aSessionTimerThatFiresBeforeTheExtendedSessionClosesSetsTheNextAtTheCloseThen() {
        UserState u = new UserState();
        assertTrue(u.apply(ev("page_view", T0), GAP, SLIDE, SLICES, LIMIT));
        assertEquals(T0 + GAP - 1, u.sessionTimerToSet(GAP, Long.MIN_VALUE));
        for (long t = T0 + 60_000; t < T0 + 10 * 60_000; t += 60_000) { // nine events: no timer moves
            assertTrue(u.apply(ev("page_view", t), GAP, SLIDE, SLICES, LIMIT));
            assertEquals(-1, u.sessionTimerToSet(GAP, Long.MIN_VALUE));
        }
        assertTrue(u.closeDue(T0 + GAP - 1, GAP).isEmpty());
        assertEquals(T0 + 9 * 60_000 + GAP - 1, u.sessionTimerToSet(GAP, T0 + GAP - 1));
        assertEquals(10, u.closeDue(T0 + 9 * 60_000 + GAP - 1, GAP).get(0).nEvents());
    }

    @Test
    void stateBytesOfFormatOneReadWithNoSessionTimerKnown() {
        UserState u = run(ev("page_view", T0), ev("add_to_cart", T0 + 60_000, true, "p9", "bags", 500L, 2));
        u.sessionTimerToSet(GAP, Long.MIN_VALUE);
        byte[] three = u.toBytes(); // nothing bought: format 3 ends with the timer and a count of 0
        byte[] one = java.util.Arrays.copyOf(three, three.length - 12); // format 1 ended before the timer
        one[0] = 1;
        UserState old = UserState.fromBytes(one);
        assertEquals(-1, old.sessionTimerMs);
        assertEquals(u.nextCloseMs(GAP), old.nextCloseMs(GAP));
        assertEquals(u.version(), old.version());
        // the next event sets the timer the earlier release did not keep
        assertTrue(old.apply(ev("page_view", T0 + 120_000), GAP, SLIDE, SLICES, LIMIT));
        assertEquals(T0 + 120_000 + GAP - 1, old.sessionTimerToSet(GAP, Long.MIN_VALUE));
    }

    @Test
    void stateBytesOfFormatTwoReadWithTheTimerAndNothingBought() {
        UserState u = run(ev("page_view", T0), ev("add_to_cart", T0 + 60_000, true, "p9", "bags", 500L, 2));
        u.sessionTimerToSet(GAP, Long.MIN_VALUE);
        byte[] three = u.toBytes();
        byte[] two = java.util.Arrays.copyOf(three, three.length - 4); // format 2 ended with the timer
        two[0] = 2;
        UserState old = UserState.fromBytes(two);
        assertEquals(u.sessionTimerMs, old.sessionTimerMs);
        assertNull(old.boughtJson());
        assertTrue(old.apply(ev("purchase", T0 + 120_000, true, "p9", "bags", 500L, 1), GAP, SLIDE, SLICES, LIMIT));
        assertEquals("[\"p9\"]", UserState.fromBytes(old.toBytes()).boughtJson());
    }

    @Test
    void theProductsBoughtAreTheNewestDistinctOnesWithConsentNewestFirstAndBounded() {
        UserState u = run(ev("purchase", T0 + 5_000, true, "b", "x", 100L, 1),
                ev("purchase", T0 + 1_000, true, "a", "x", 100L, 1),       // out of order: older
                ev("purchase", T0 + 9_000, false, "secret", "x", 100L, 1), // no consent: not listed
                ev("purchase", T0 + 5_000, true, "a\"q", "x", 100L, 1),  // a tie: by id
                ev("purchase", T0 + 7_000, true, "a", "x", 100L, 1),       // bought again: moves up
                ev("add_to_cart", T0 + 8_000, true, "cart-only", "x", 100L, 1));
        assertEquals("[\"a\",\"a\\\"q\",\"b\"]", u.boughtJson());
        UserState many = new UserState();
        for (int i = 0; i < UserState.BOUGHT_KEPT + 5; i++) {
            many.apply(ev("purchase", T0 + i * 1000L, true, "p" + i, "x", 100L, 1), GAP, SLIDE, SLICES, LIMIT);
        }
        many.apply(ev("purchase", T0 - 1, true, "ancient", "x", 100L, 1), GAP, SLIDE, SLICES, LIMIT);
        many = UserState.fromBytes(many.toBytes());
        assertEquals(UserState.BOUGHT_KEPT, many.boughtIds.size());
        assertEquals("p" + (UserState.BOUGHT_KEPT + 4), many.boughtIds.get(0));
        assertEquals("p5", many.boughtIds.get(UserState.BOUGHT_KEPT - 1));
        assertFalse(many.boughtIds.contains("ancient"));
    }

    @Test
    void theNextEventAGapLaterStartsANewSessionEvenBeforeTheOldOneCloses() {
        UserState u = run(ev("page_view", T0), ev("page_view", T0 + GAP - 1), ev("page_view", T0 + 2 * GAP - 1));
        assertEquals(2, u.open.size());
        assertEquals(T0 + 2 * GAP - 1, u.current().startMs());
        List<UserState.Session> closed = u.closeDue(T0 + 2 * GAP - 2, GAP);
        assertEquals(1, closed.size());
        assertEquals(2, closed.get(0).nEvents());
        assertEquals(1, u.current().nEvents());
    }

    @Test
    void anOutOfOrderEventThatBridgesTwoOpenSessionsMergesThem() {
        UserState u = run(ev("page_view", T0), ev("page_view", T0 + GAP + 10 * 60_000L),
                ev("product_view", T0 + 20 * 60_000L));
        assertEquals(1, u.open.size());
        UserState.Session s = u.current();
        assertEquals(T0, s.startMs());
        assertEquals(T0 + GAP + 10 * 60_000L, s.endMs());
        assertEquals(3, s.nEvents());
    }

    @Test
    void theLiveSessionHasItsNetCartTopCategoryProductsAndLastCartAdd() {
        UserState u = run(
                ev("product_view", T0, true, "p1", "shoes", 1000L, 1),
                ev("product_view", T0 + 1, true, "p2", "bags", 500L, 1),
                ev("add_to_cart", T0 + 2, true, "p1", "shoes", 1000L, 2),
                ev("add_to_cart", T0 + 3, true, "p2", "bags", 500L, 1),
                ev("add_to_cart", T0 + 4, true, "p1", "shoes", 1100L, 1), // the latest add's price
                ev("remove_from_cart", T0 + 5, true, "p2", "bags", 500L, 1),
                ev("remove_from_cart", T0 + 6, true, "p7", "hats", 100L, 5), // never added: nothing
                ev("product_view", T0 + 7, true, "p3", "shoes", 300L, 1));
        UserState.Session s = u.current();
        assertEquals("[{\"product_id\":\"p1\",\"quantity\":3,\"price\":\"11.00\"}]", s.cartJson());
        assertEquals(3300, s.cartValueCents());
        assertEquals("shoes", s.topCategory());
        assertEquals(3, s.productViews());
        assertEquals(3, s.distinctProducts()); // p1, p2, p3 (p7 was only removed)
        assertEquals(T0 + 4, s.lastCartAddMs());
        assertEquals(8, s.nEvents());
    }

    @Test
    void theVersionGrowsWithEveryChangeAndAcrossAnErasure() {
        UserState u = run(ev("page_view", T0));
        long v1 = u.version();
        assertTrue(u.apply(ev("page_view", T0 - 10), GAP, SLIDE, SLICES, LIMIT)); // older: still a change
        long v2 = u.version();
        assertTrue(v2 > v1);
        u.closeDue(Long.MAX_VALUE, GAP);
        long v3 = u.version();
        assertTrue(v3 > v2);
        assertTrue(u.apply(new UserState.Event("u1", "page_view", null, null, null, 1, true, true, T0 - 20, 7),
                GAP, SLIDE, SLICES, LIMIT));
        assertTrue(u.version() > v3);
        assertEquals(7, u.epoch());
        assertEquals(1, u.nEvents()); // the erasure dropped what came before
        // an event of the superseded epoch changes nothing
        assertFalse(u.apply(ev("page_view", T0 + 99), GAP, SLIDE, SLICES, LIMIT));
        assertEquals(1, u.nEvents());
    }

    @Test
    void listsKeepTheirFirstItemsUpToTheLimit() {
        UserState u = new UserState();
        for (int i = 0; i < 5; i++) {
            u.apply(ev("add_to_cart", T0 + i, true, "p" + i, "c" + i, 100L, 1), GAP, SLIDE, SLICES, 3);
        }
        String[] cols = u.closeDue(Long.MAX_VALUE, GAP).get(0).packed("u1", 0).split("\u001d", -1);
        assertEquals(3, cols[13].split("\u001e").length);
        assertEquals("c0\u001ec1\u001ec2", cols[14]);
        assertEquals("5", cols[7]); // the counts are not bounded
    }

    @Test
    void theHistoryFoldsOnlyClosedSessionsWithPersonalizationConsent() {
        UserState u = run(ev("purchase", T0, true, "p1", "c", 250L, 2), ev("page_view", T0 + GAP, false, null, null,
                null, 1), ev("page_view", T0 + 2 * GAP + 5));
        u.closeDue(T0 + 2 * GAP, GAP); // the first two sessions close, the second without consent
        Features.History h = u.history();
        assertEquals(new Features.History(1, 1, 500, T0), h);
        u.closeDue(Long.MAX_VALUE, GAP);
        assertEquals(new Features.History(2, 1, 500, T0 + 2 * GAP + 5), UserState.fromBytes(u.toBytes()).history());
    }

    @Test
    void aClosedSessionWithConsentCarriesTheModelsFeaturesFromTheHistoryBeforeAndAfterIt() {
        UserState u = run(ev("purchase", T0, true, "p1", "c", 250L, 2), ev("page_view", T0 + GAP, false, null, null,
                null, 1), ev("add_to_cart", T0 + 3 * GAP, true, "p2", "c", 100L, 1));
        List<UserState.Session> closed = u.closeDue(Long.MAX_VALUE, GAP);
        assertEquals(3, closed.size());
        String[] first = closed.get(0).packed("u1", 0).split("\u001d", -1);
        String[] second = closed.get(1).packed("u1", 0).split("\u001d", -1);
        String[] third = closed.get(2).packed("u1", 0).split("\u001d", -1);
        assertEquals(Features.COUNT, doubles(first[19]).length);
        assertEquals(1.0, doubles(first[19])[0]); // no session before it
        assertEquals("", second[19]); // without consent: no features, not in the history
        assertEquals("", second[20]);
        double[] propensity = doubles(third[19]);
        assertEquals(0.0, propensity[0]); // one consented session before it
        assertEquals(Math.log1p(1), propensity[1]);
        assertEquals(1.0, propensity[2]); // it bought
        double[] segment = doubles(third[20]);
        assertEquals(6, segment.length);
        // after it: two sessions and 5.00 of revenue; recency from the first one's end, 3 gaps before
        assertEquals(Math.log1p(3 * GAP / 3_600_000.0), segment[0]);
        assertEquals(Math.log1p(2), segment[1]);
        assertEquals(Math.log1p(5.0), segment[2]);
        assertEquals(Math.log1p(1), segment[4]); // one cart add
        assertEquals(1.0, segment[5]); // every categorised event in one category
    }

    @Test
    void aUserInactiveForTheStateTtlComesBackAsANewOneWithAVersionThatStillGrows() {
        long ttl = 6 * GAP;
        UserState u = new UserState();
        assertTrue(u.apply(ev("purchase", T0, true, "p1", "c", 250L, 2), GAP, SLIDE, SLICES, LIMIT, ttl));
        u.closeDue(Long.MAX_VALUE, GAP);
        assertTrue(u.apply(ev("page_view", T0 + ttl - 1), GAP, SLIDE, SLICES, LIMIT, ttl)); // within: kept
        assertEquals(2, u.nEvents());
        long before = u.version();
        assertTrue(u.apply(ev("page_view", T0 + 2 * ttl - 1), GAP, SLIDE, SLICES, LIMIT, ttl)); // inactive ttl
        assertEquals(1, u.nEvents());
        assertEquals(0, u.revenueCents());
        assertEquals(new Features.History(0, 0, 0, null), u.history());
        assertTrue(u.version() > before);
    }
}
