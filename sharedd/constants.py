"""Names shared by the engine, the D-Bus layer, mountd, docs and tests.

One source of truth: nothing else spells these strings.
"""

# --- D-Bus names (API version 1) -------------------------------------------
BUS_NAME = "org.sharedd.Sharedd1"
ROOT_PATH = "/org/sharedd/Sharedd1"
IFACE_MANAGER = "org.sharedd.Sharedd1.Manager"
IFACE_BACKEND = "org.sharedd.Sharedd1.Backend"
IFACE_SHARE = "org.sharedd.Sharedd1.Share"
IFACE_SNAPSHOT = "org.sharedd.Sharedd1.Snapshot"
IFACE_HOOKS = "org.sharedd.Sharedd1.Hooks"
IFACE_SHARE_NETWORK = "org.sharedd.Sharedd1.ShareNetwork"
IFACE_SHARE_SERVER = "org.sharedd.Sharedd1.ShareServer"
IFACE_JOB = "org.sharedd.Sharedd1.Job"
IFACE_REPLICA = "org.sharedd.Sharedd1.Replica"
IFACE_SHARE_GROUP = "org.sharedd.Sharedd1.ShareGroup"
IFACE_SHARE_GROUP_SNAPSHOT = "org.sharedd.Sharedd1.ShareGroupSnapshot"
ERROR_PREFIX = "org.sharedd.Sharedd1.Error."
BACKEND_PATH = ROOT_PATH + "/backend"
SHARE_PATH = ROOT_PATH + "/share"
SNAPSHOT_PATH = ROOT_PATH + "/snapshot"
SHARE_NETWORK_PATH = ROOT_PATH + "/share_network"
SHARE_SERVER_PATH = ROOT_PATH + "/share_server"
JOB_PATH = ROOT_PATH + "/job"
REPLICA_PATH = ROOT_PATH + "/replica"
SHARE_GROUP_PATH = ROOT_PATH + "/share_group"
SHARE_GROUP_SNAPSHOT_PATH = ROOT_PATH + "/share_group_snapshot"

#: the methods that change nothing: every local user may call them (the bus
#: policy says so) and they leave no audit record
READ_ONLY_METHODS = ("ListShares", "ListSnapshots", "FindShareByName")

# --- Authorization (polkit) ----------------------------------------------------
POLKIT_PREFIX = "org.sharedd.Sharedd1."
ACTION_READ = POLKIT_PREFIX + "read"
ACTION_MANAGE_SHARES = POLKIT_PREFIX + "manage-shares"
ACTION_MANAGE_ACCESS = POLKIT_PREFIX + "manage-access"
ACTION_MANAGE_SNAPSHOTS = POLKIT_PREFIX + "manage-snapshots"
ACTION_ADMIN = POLKIT_PREFIX + "admin"
#: the polkit action each state-changing method needs, by interface short
#: name and member; a method not listed needs ACTION_ADMIN (fail closed)
METHOD_ACTIONS = {
    **{("Manager", m): ACTION_MANAGE_SHARES
       for m in ("CreateShare", "ManageShare", "CreateShareGroup")},
    **{("Share", m): ACTION_MANAGE_SHARES
       for m in ("Extend", "Shrink", "Delete", "Unmanage", "Migrate", "CompleteMigration",
                 "CancelMigration", "CreateReplica", "SetSnapshotPolicy")},
    **{("Replica", m): ACTION_MANAGE_SHARES for m in ("Promote", "Resync", "Delete")},
    ("ShareGroup", "Delete"): ACTION_MANAGE_SHARES,
    ("Share", "AllowAccess"): ACTION_MANAGE_ACCESS,
    ("Share", "DenyAccess"): ACTION_MANAGE_ACCESS,
    **{("Snapshot", m): ACTION_MANAGE_ACCESS for m in ("AllowAccess", "DenyAccess")},
    **{("Share", m): ACTION_MANAGE_SNAPSHOTS for m in ("CreateSnapshot", "RevertToSnapshot")},
    **{("Snapshot", m): ACTION_MANAGE_SNAPSHOTS for m in ("Delete", "Unmanage")},
    ("Manager", "ManageSnapshot"): ACTION_MANAGE_SNAPSHOTS,
    ("ShareGroup", "CreateSnapshot"): ACTION_MANAGE_SNAPSHOTS,
    ("ShareGroupSnapshot", "Delete"): ACTION_MANAGE_SNAPSHOTS,
}
#: the a{sv} option that asks for no authentication dialog (as UDisks2's)
OPTION_NO_USER_INTERACTION = "auth.no_user_interaction"

MOUNTD_BUS_NAME = "org.sharedd.Mountd1"
MOUNTD_ROOT_PATH = "/org/sharedd/Mountd1"
MOUNTD_IFACE = "org.sharedd.Mountd1"

# --- Domain values -----------------------------------------------------------
PROTOCOLS = ("NFS", "CIFS", "GLUSTERFS")
ACCESS_TYPES = ("ip", "user", "cert")
ACCESS_LEVELS = ("rw", "ro")
#: what an NFS server makes of a client's root (and, all_squash, of every
#: uid): root_squash is the default; no_root_squash must be asked for
SQUASH_MODES = ("root_squash", "all_squash", "no_root_squash")
#: the anonymous uid/gid squashed users become (nobody/nogroup on Debian)
DEFAULT_ANON_ID = 65534
#: uid_t and gid_t stop below 2**32 - 1, which means "no id"
MAX_ANON_ID = 2**32 - 2
#: whether a share's clients see its snapshots (snapshot_visibility): a
#: share says one of these or "" (its backend's); the backend option also
#: takes auto (CIFS shares show them, NFS shares do not)
SNAPSHOTS_VISIBLE, SNAPSHOTS_HIDDEN = "visible", "hidden"
SNAPSHOT_VISIBILITIES = (SNAPSHOTS_VISIBLE, SNAPSHOTS_HIDDEN)

# Manila's statuses.
STATUS_CREATING = "creating"
STATUS_AVAILABLE = "available"
STATUS_ERROR = "error"
STATUS_DELETING = "deleting"
STATUS_EXTENDING = "extending"
STATUS_SHRINKING = "shrinking"
STATUS_REVERTING = "reverting"
STATUS_MANAGE_STARTING = "manage_starting"
STATUS_UNMANAGE_STARTING = "unmanage_starting"
#: a share being moved to another backend (Manila's task_state, as a status)
STATUS_MIGRATING = "migrating"
#: a share whose active replica is changing (Manila's name): Promote
STATUS_REPLICATION_CHANGE = "replication_change"
#: share servers (Manila's names)
SERVER_ACTIVE = "active"
SERVER_STATUSES = (STATUS_CREATING, SERVER_ACTIVE, STATUS_ERROR, STATUS_DELETING)
#: addresses one share network's allocation range may hold (bounds the search)
MAX_ALLOCATION_RANGE = 65536

SHARE_STATUSES = (STATUS_CREATING, STATUS_AVAILABLE, STATUS_ERROR,
                  STATUS_DELETING, STATUS_EXTENDING, STATUS_SHRINKING,
                  STATUS_REVERTING, STATUS_MANAGE_STARTING,
                  STATUS_UNMANAGE_STARTING, STATUS_MIGRATING, STATUS_REPLICATION_CHANGE)

#: what ListShares filters by, each a string (name: unique; each of the
#: others has an index of the state database, made at its next open, that
#: lists its shares oldest first: one more key costs every write)
SHARE_FILTERS = ("backend", "protocol", "status", "name")

# Replication (Manila's names). A replica's status is its life cycle; its
# role says which copy serves read-write; its state how current a copy is.
REPLICA_STATUSES = (STATUS_CREATING, STATUS_AVAILABLE, STATUS_ERROR, STATUS_DELETING)
#: share groups and their snapshots
GROUP_STATUSES = (STATUS_CREATING, STATUS_AVAILABLE, STATUS_ERROR, STATUS_DELETING)
#: shares one share group may hold (each group snapshot takes one snapshot of each)
MAX_GROUP_MEMBERS = 64
ROLE_ACTIVE = "active"
ROLE_REPLICA = "replica"
REPLICA_ROLES = (ROLE_ACTIVE, ROLE_REPLICA)
REPLICA_IN_SYNC = "in_sync"
REPLICA_OUT_OF_SYNC = "out_of_sync"
REPLICA_STATES = (REPLICA_IN_SYNC, REPLICA_OUT_OF_SYNC, STATUS_ERROR)
#: dr: the replica is not exported; readable: exported read-only with the share's rules
REPLICATION_STYLES = ("dr", "readable")
#: replicas one share may have besides its active copy
MAX_REPLICAS_PER_SHARE = 8

RULE_QUEUED_TO_APPLY = "queued_to_apply"
RULE_APPLYING = "applying"
RULE_ACTIVE = "active"
RULE_ERROR = "error"
RULE_QUEUED_TO_DENY = "queued_to_deny"
RULE_DENYING = "denying"
RULE_STATES = (RULE_QUEUED_TO_APPLY, RULE_APPLYING, RULE_ACTIVE, RULE_ERROR,
               RULE_QUEUED_TO_DENY, RULE_DENYING)

# Hook phases and the wrapped driver methods, named as the seed names them.
PHASE_PRE = "pre"
PHASE_POST = "post"
PHASE_PERIODIC = "periodic"
HOOK_PHASES = (PHASE_PRE, PHASE_POST, PHASE_PERIODIC)
HOOK_METHODS = (
    "create_share", "create_share_from_snapshot", "delete_share",
    "setup_server", "delete_share_server",
    "create_snapshot", "delete_snapshot", "revert_to_snapshot",
    "allow_access", "deny_access", "extend_share", "shrink_share",
    "manage_share", "unmanage_share", "ensure_share",
    "manage_existing_snapshot", "unmanage_snapshot", "snapshot_update_access",
    "create_share_group", "delete_share_group", "create_share_group_snapshot",
    "delete_share_group_snapshot", "create_share_group_from_share_group_snapshot",
    "migration_start", "migration_complete", "migration_cancel",
    "create_share_replica", "delete_share_replica", "promote_share_replica",
    "update_share_replica", "create_replicated_snapshot", "delete_replicated_snapshot",
    "revert_to_replicated_snapshot",
    "publish_service_capabilities", "periodic",
)

#: seconds a driver's capacity figures serve the capacity checks of creates
#: and extends (the totals of provisioned GiB are always current)
CAPACITY_STATS_MAX_AGE = 1.0
#: seconds a staged hook record's thread waits, after its COMMIT, for the
#: shared fsync that lets it be shown (longer is a dead disk: dropped)
STAGED_FSYNC_WAIT = 300.0
#: threads for staged hook records (each waits for its commit's fsync)
STAGED_THREADS = 64
#: seconds between two PropertiesChanged of one backend's Stats (the last
#: state is always announced); a Get always reads the current figures
BACKEND_SIGNAL_INTERVAL = 0.5

# --- Limits: the record schema and the options' maxima derive from these -----
#: access rules on one share (option max_access_rules_per_share may lower it)
MAX_ACCESS_RULES_PER_SHARE = 5000
#: access rules on one snapshot, and snapshots of one share with rules (every
#: record of the share lists its exported snapshots with their rules)
MAX_SNAPSHOT_ACCESS_RULES = 64
MAX_EXPORTED_SNAPSHOTS = 16
#: a periodic record is split into parts of about this many bytes (estimated
#: before it is built: per share PERIODIC_SHARE_BYTES plus PERIODIC_RULE_BYTES
#: per rule, generous bounds), far below sharedd.record.MAX_RECORD_BYTES
PERIODIC_PART_BYTES = 1 << 20
PERIODIC_SHARE_BYTES = 2048
PERIODIC_RULE_BYTES = 320
#: metadata entries on one share (option max_metadata_entries may lower it)
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 1024
#: description length (option max_description_length may lower it)
MAX_DESCRIPTION_LENGTH = 1024
#: warnings carried in a post record's result (hook failures a revocation overrode)
MAX_RECORD_WARNINGS = 8

# Share names: a safe character set that also works as a directory,
# SMB share and export pseudo-path component.
SHARE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
