"""Export helper registry, per protocol: short name -> module:Class."""

NFS_HELPERS = {
    "ganesha": "sharedd.helpers.ganesha:GaneshaHelper",
}
CIFS_HELPERS = {}
