"""Export helper registry, per protocol: short name -> module:Class."""

NFS_HELPERS = {
    "ganesha": "sharedd.helpers.ganesha:GaneshaHelper",
    "kernel": "sharedd.helpers.kernel_nfs:KernelNfsHelper",
}
CIFS_HELPERS = {
    "samba": "sharedd.helpers.samba:SambaHelper",
}
