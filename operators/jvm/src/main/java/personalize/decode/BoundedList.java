package personalize.decode;

import org.apache.flink.table.functions.AggregateFunction;

/**
 * {@code bounded_list(item) -> STRING}: LISTAGG with a bound (registered by jobs/profile.py
 * for the session windows' lists: cart moves, categories, product views).
 *
 * <p>Joins the non-NULL items with the separator, as {@code LISTAGG(item, separator)} does,
 * but keeps only the first {@code limit} of them (in arrival order; a merge of two sessions
 * keeps the first one's items first). A session that never closes (a bot with events less
 * than the gap apart) otherwise grows its lists, its window state and the row that reaches
 * Python without bound; plain SQL has no way to cap a LISTAGG. NULL when no item came.
 */
public final class BoundedList extends AggregateFunction<String, BoundedList.Items> {

    /** The accumulator (Flink state): the joined items and how many they are. */
    public static final class Items {
        public String text;
        public int count;
    }

    private final String separator;
    private final int limit;

    public BoundedList(String separator, String limit) {
        this.separator = separator;
        this.limit = Integer.parseInt(limit);
        if (this.limit < 1) {
            throw new IllegalArgumentException("bounded_list keeps at least one item, got " + limit);
        }
    }

    @Override
    public Items createAccumulator() {
        return new Items();
    }

    public void accumulate(Items items, String item) {
        if (item == null || items.count >= limit) {
            return;
        }
        items.text = items.count == 0 ? item : items.text + separator + item;
        items.count++;
    }

    public void merge(Items items, Iterable<Items> others) {
        for (Items other : others) {
            if (other.count == 0 || items.count >= limit) {
                continue;
            }
            int take = Math.min(other.count, limit - items.count);
            String text = other.text;
            if (take < other.count) {
                int end = 0;
                for (int i = 0, from = 0; i < take; i++, from = end + separator.length()) {
                    end = text.indexOf(separator, from);
                }
                text = text.substring(0, end); // the items carry no separator (decode refuses it)
            }
            items.text = items.count == 0 ? text : items.text + separator + text;
            items.count += take;
        }
    }

    @Override
    public String getValue(Items items) {
        return items.count == 0 ? null : items.text;
    }
}
