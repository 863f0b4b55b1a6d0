package personalize.profile;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.HexFormat;
import java.util.List;

import org.junit.jupiter.api.Test;

/**
 * The JVM's half of a cart-abandonment trigger (pure logic); byte equality with fastavro's
 * encoding of the Python record is held by tests/unit/operators/test_features_jvm.py.
 */
class AbandonmentTest {
    static String move(String sign, String product, int quantity, String cents, long at) {
        return String.join("\u001f", sign, product, Integer.toString(quantity), cents, Long.toString(at));
    }

    static String moves(String... moves) {
        return String.join("\u001e", moves);
    }

    @Test
    void theTriggerIdIsPythonsUuid5OfKindUserAndStart() {
        // uuid.uuid5(triggers._NAMESPACE, "cart_abandonment|u1|1699999800000") and a non-ASCII user
        assertEquals("e818b826-2779-54ba-82d1-97a247df8d07", Abandonment.triggerId("u1", 1_699_999_800_000L));
        assertEquals("6e1fbb1d-9d59-529f-a323-dbee53e89b9f", Abandonment.triggerId("ü€😀", -5));
    }

    @Test
    void decimalsTakeAsManyBytesAsFastavroGivesThem() {
        // fastavro: (bit length of the magnitude + 8) // 8 bytes, so -1.28 is ff80, not 80
        String[][] cases = {{"-128", "04ff80"}, {"0", "0200"}, {"127", "027f"}, {"128", "040080"}, {"-1", "02ff"},
                            {"32767", "047fff"}, {"-32768", "06ff8000"}};
        for (String[] c : cases) {
            Abandonment.Avro out = new Abandonment.Avro();
            out.decimal(Long.parseLong(c[0]));
            assertEquals(c[1], HexFormat.of().formatHex(out.toByteArray()), c[0]);
        }
    }

    @Test
    void netLinesAreAddedMinusRemovedWithTheLatestAddsPriceByProduct() {
        List<Object[]> lines = Abandonment.netLines(moves(
                move("+", "p2", 2, "500", 10), move("+", "p2", 1, "700", 30), move("-", "p2", 1, "", 40),
                move("+", "p1", 1, "300", 20), move("+", "p1", 1, "900", 20), // the same time: the higher price
                move("-", "p3", 1, "", 5), // removed, never added
                move("+", "p4", 1, "100", 1), move("-", "p4", 1, "", 2)));
        assertEquals(2, lines.size());
        assertArrayEquals(new Object[] {"p1", 2L, 900L}, lines.get(0));
        assertArrayEquals(new Object[] {"p2", 2L, 700L}, lines.get(1));
    }

    @Test
    void productIdsOrderByCodePointAsPythonsSorted() {
        // U+FF01 is above U+1F600's UTF-16 surrogates but below its code point
        List<Object[]> lines = Abandonment.netLines(moves(move("+", "😀", 1, "1", 1), move("+", "！", 1, "1", 1)));
        assertEquals("！", lines.get(0)[0]);
        assertEquals("😀", lines.get(1)[0]);
    }

    @Test
    void noneIsDueAfterAPurchaseWithoutMarketingConsentOrWithAnEmptyCart() {
        String carted = moves(move("+", "p1", 1, "100", 1));
        assertNotNull(Abandonment.prefix("u", 0, 1, 0, true, carted));
        assertNull(Abandonment.prefix("u", 0, 1, 1, true, carted));
        assertNull(Abandonment.prefix("u", 0, 1, 0, false, carted));
        assertNull(Abandonment.prefix("u", 0, 1, 0, true, moves(move("+", "p1", 1, "100", 1), move("-", "p1", 1, "", 2))));
        assertNull(Abandonment.prefix("u", 0, 1, 0, true, ""));
    }

    @Test
    void aCartOfMoreThanAHundredLinesListsTheMostValuable() {
        StringBuilder all = new StringBuilder();
        for (int i = 0; i < 150; i++) {
            all.append(i > 0 ? "\u001e" : "").append(move("+", String.format("p%03d", i), 1, Integer.toString(i), i));
        }
        String body = new String(java.util.Base64.getDecoder().decode(Abandonment.prefix("u", 0, 1, 0, true, all)),
                java.nio.charset.StandardCharsets.ISO_8859_1);
        assertTrue(body.contains("p050") && body.contains("p149") && !body.contains("p049"));
        assertTrue(body.indexOf("p050") < body.indexOf("p149")); // then by product id
    }
}
