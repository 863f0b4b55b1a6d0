package personalize.profile;

import java.io.IOException;

import org.apache.flink.api.common.typeutils.SimpleTypeSerializerSnapshot;
import org.apache.flink.api.common.typeutils.TypeSerializerSnapshot;
import org.apache.flink.api.common.typeutils.base.TypeSerializerSingleton;
import org.apache.flink.core.memory.DataInputView;
import org.apache.flink.core.memory.DataOutputView;

/**
 * A user's {@link UserState} in Flink keyed state: the object itself on the heap backend (read
 * and changed in place per event, no bytes in between), its {@link UserState#toBytes} form in
 * checkpoints, savepoints and RocksDB. {@link #copy} is deep: the heap backend copies an entry a
 * running snapshot still needs before the function changes it.
 */
public final class UserStateSerializer extends TypeSerializerSingleton<UserState> {
    public static final UserStateSerializer INSTANCE = new UserStateSerializer();
    private static final long serialVersionUID = 1L;

    @Override
    public boolean isImmutableType() {
        return false;
    }

    @Override
    public UserState createInstance() {
        return new UserState();
    }

    @Override
    public UserState copy(UserState from) {
        return UserState.fromBytes(from.toBytes());
    }

    @Override
    public UserState copy(UserState from, UserState reuse) {
        return copy(from);
    }

    @Override
    public int getLength() {
        return -1;
    }

    @Override
    public void serialize(UserState record, DataOutputView target) throws IOException {
        byte[] bytes = record.toBytes();
        target.writeInt(bytes.length);
        target.write(bytes);
    }

    @Override
    public UserState deserialize(DataInputView source) throws IOException {
        byte[] bytes = new byte[source.readInt()];
        source.readFully(bytes);
        return UserState.fromBytes(bytes);
    }

    @Override
    public UserState deserialize(UserState reuse, DataInputView source) throws IOException {
        return deserialize(source);
    }

    @Override
    public void copy(DataInputView source, DataOutputView target) throws IOException {
        int n = source.readInt();
        target.writeInt(n);
        target.write(source, n);
    }

    @Override
    public TypeSerializerSnapshot<UserState> snapshotConfiguration() {
        return new Snapshot();
    }

    /** The serializer's snapshot: the state bytes carry their own format number. */
    public static final class Snapshot extends SimpleTypeSerializerSnapshot<UserState> {
        public Snapshot() {
            super(() -> INSTANCE);
        }
    }
}
