"""Defaults of settings that are more than one value: the origin's port forwards, the pinned downloads."""

ORIGIN_FORWARDS = [
    {"host": 2222, "guest": 22},  # SSH
    {"host": 45631, "guest": 45631},  # Kind API server
    {"host": 33000, "guest": 3000},  # general (the origin's Grafana)
]

# Official release binaries, pinned (kind v0.26.0 runs Kubernetes 1.32 nodes;
# kubectl matches). Fetched at build time and verified.
DEFAULT_DOWNLOADS = [
    {
        "name": "kind",
        "url": "https://github.com/kubernetes-sigs/kind/releases/download/v0.26.0/kind-linux-amd64",
        "sha256": "d445b44c28297bc23fd67e51cc24bb294ae7b977712be2d4d312883d0835829b",
        "dest": "/usr/local/bin/kind",
    },
    {
        "name": "kubectl",
        "url": "https://dl.k8s.io/release/v1.32.1/bin/linux/amd64/kubectl",
        "sha256": "e16c80f1a9f94db31063477eb9e61a2e24c1a4eee09ba776b029048f5369db0c",
        "dest": "/usr/local/bin/kubectl",
    },
]
