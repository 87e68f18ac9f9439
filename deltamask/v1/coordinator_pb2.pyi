from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_KIND_UNSPECIFIED: _ClassVar[DeviceKind]
    RPI4: _ClassVar[DeviceKind]
    JETSON_NANO: _ClassVar[DeviceKind]
    CORAL: _ClassVar[DeviceKind]
    LAPTOP: _ClassVar[DeviceKind]
    SERVER: _ClassVar[DeviceKind]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    IDLE: _ClassVar[Phase]
    HEAD: _ClassVar[Phase]
    MASK: _ClassVar[Phase]
    DONE: _ClassVar[Phase]
    REFIT: _ClassVar[Phase]
DEVICE_KIND_UNSPECIFIED: DeviceKind
RPI4: DeviceKind
JETSON_NANO: DeviceKind
CORAL: DeviceKind
LAPTOP: DeviceKind
SERVER: DeviceKind
PHASE_UNSPECIFIED: Phase
IDLE: Phase
HEAD: Phase
MASK: Phase
DONE: Phase
REFIT: Phase

class RegisterRequest(_message.Message):
    __slots__ = ("name", "kind", "memory_bytes", "preferred_codec", "agent_version", "enrollment_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_CODEC_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: DeviceKind
    memory_bytes: int
    preferred_codec: str
    agent_version: str
    enrollment_token: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[DeviceKind, str]] = ..., memory_bytes: _Optional[int] = ..., preferred_codec: _Optional[str] = ..., agent_version: _Optional[str] = ..., enrollment_token: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("device_id", "heartbeat_interval_s", "backbone", "blocks", "image_size", "d", "layout_digest", "num_classes", "max_upload_bytes", "credential")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    D_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    heartbeat_interval_s: float
    backbone: str
    blocks: int
    image_size: int
    d: int
    layout_digest: str
    num_classes: int
    max_upload_bytes: int
    credential: str
    def __init__(self, device_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., backbone: _Optional[str] = ..., blocks: _Optional[int] = ..., image_size: _Optional[int] = ..., d: _Optional[int] = ..., layout_digest: _Optional[str] = ..., num_classes: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ..., credential: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("device_id", "round")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("device_id", "after_round", "wait_s", "head_sha256")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    HEAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    after_round: int
    wait_s: float
    head_sha256: str
    def __init__(self, device_id: _Optional[str] = ..., after_round: _Optional[int] = ..., wait_s: _Optional[float] = ..., head_sha256: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("phase", "round", "seed", "kappa", "codec", "reference", "deadline_unix_s", "theta_digest", "theta_bytes", "head", "num_classes", "feature_dim", "epochs", "batch_size", "lr", "head_kind", "lda_covariance", "loss", "lda_rank", "ranking", "head_sha256")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KAPPA_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    THETA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    THETA_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    HEAD_KIND_FIELD_NUMBER: _ClassVar[int]
    LDA_COVARIANCE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LDA_RANK_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    HEAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    round: int
    seed: int
    kappa: float
    codec: str
    reference: str
    deadline_unix_s: float
    theta_digest: str
    theta_bytes: int
    head: bytes
    num_classes: int
    feature_dim: int
    epochs: int
    batch_size: int
    lr: float
    head_kind: str
    lda_covariance: str
    loss: str
    lda_rank: int
    ranking: str
    head_sha256: str
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., round: _Optional[int] = ..., seed: _Optional[int] = ..., kappa: _Optional[float] = ..., codec: _Optional[str] = ..., reference: _Optional[str] = ..., deadline_unix_s: _Optional[float] = ..., theta_digest: _Optional[str] = ..., theta_bytes: _Optional[int] = ..., head: _Optional[bytes] = ..., num_classes: _Optional[int] = ..., feature_dim: _Optional[int] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., head_kind: _Optional[str] = ..., lda_covariance: _Optional[str] = ..., loss: _Optional[str] = ..., lda_rank: _Optional[int] = ..., ranking: _Optional[str] = ..., head_sha256: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("device_id", "round", "offset")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    offset: int
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("total_length", "sha256", "offset", "data")
    TOTAL_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    total_length: int
    sha256: str
    offset: int
    data: bytes
    def __init__(self, total_length: _Optional[int] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("num_examples", "train_loss", "train_s", "encode_s", "fetch_s", "peak_rss_bytes", "cpu_s", "energy_j", "energy_meter", "delta", "kept")
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_S_FIELD_NUMBER: _ClassVar[int]
    ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    FETCH_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_S_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_METER_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    num_examples: int
    train_loss: float
    train_s: float
    encode_s: float
    fetch_s: float
    peak_rss_bytes: int
    cpu_s: float
    energy_j: float
    energy_meter: str
    delta: int
    kept: int
    def __init__(self, num_examples: _Optional[int] = ..., train_loss: _Optional[float] = ..., train_s: _Optional[float] = ..., encode_s: _Optional[float] = ..., fetch_s: _Optional[float] = ..., peak_rss_bytes: _Optional[int] = ..., cpu_s: _Optional[float] = ..., energy_j: _Optional[float] = ..., energy_meter: _Optional[str] = ..., delta: _Optional[int] = ..., kept: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("device_id", "round", "reference_digest", "total_length", "sha256", "metrics")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    reference_digest: str
    total_length: int
    sha256: str
    metrics: Metrics
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., reference_digest: _Optional[str] = ..., total_length: _Optional[int] = ..., sha256: _Optional[str] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    def __init__(self, accepted: bool = ..., duplicate: bool = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("device_id", "round")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "phase", "selected", "received", "accuracy", "uplink_bpp", "downlink_bpp", "state", "accuracy_expected")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    UPLINK_BPP_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_BPP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: Phase
    selected: int
    received: int
    accuracy: float
    uplink_bpp: float
    downlink_bpp: float
    state: str
    accuracy_expected: float
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., selected: _Optional[int] = ..., received: _Optional[int] = ..., accuracy: _Optional[float] = ..., uplink_bpp: _Optional[float] = ..., downlink_bpp: _Optional[float] = ..., state: _Optional[str] = ..., accuracy_expected: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("round", "phase", "registered", "online", "history")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: Phase
    registered: int
    online: int
    history: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., registered: _Optional[int] = ..., online: _Optional[int] = ..., history: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ...) -> None: ...

class DevicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device_id", "name", "kind", "online", "seen_s_ago", "codec", "told_done", "revoked")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    SEEN_S_AGO_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOLD_DONE_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    name: str
    kind: str
    online: bool
    seen_s_ago: float
    codec: str
    told_done: bool
    revoked: bool
    def __init__(self, device_id: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., online: bool = ..., seen_s_ago: _Optional[float] = ..., codec: _Optional[str] = ..., told_done: bool = ..., revoked: bool = ...) -> None: ...

class DevicesReply(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ...) -> None: ...

class UpdatesRequest(_message.Message):
    __slots__ = ("from_round",)
    FROM_ROUND_FIELD_NUMBER: _ClassVar[int]
    from_round: int
    def __init__(self, from_round: _Optional[int] = ...) -> None: ...

class UpdateInfo(_message.Message):
    __slots__ = ("round", "phase", "device_id", "name", "nbytes", "metrics")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: Phase
    device_id: str
    name: str
    nbytes: int
    metrics: Metrics
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., device_id: _Optional[str] = ..., name: _Optional[str] = ..., nbytes: _Optional[int] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ...) -> None: ...

class UpdatesReply(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[UpdateInfo]
    def __init__(self, updates: _Optional[_Iterable[_Union[UpdateInfo, _Mapping]]] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("offset",)
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    def __init__(self, offset: _Optional[int] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RevokeReply(_message.Message):
    __slots__ = ("device_id", "was_revoked")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    WAS_REVOKED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    was_revoked: bool
    def __init__(self, device_id: _Optional[str] = ..., was_revoked: bool = ...) -> None: ...
