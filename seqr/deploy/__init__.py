"""Deployment helpers around Flower's own commands (flower-superlink, flower-supernode, flwr).

certs.py: a test CA and a SuperLink TLS certificate (``seqr deploy certs``);
node_keys.py: a SuperNode authentication key pair (``seqr deploy node-key``);
files.py: the shared way both write key and certificate files (new files only, 0600 secrets).
"""
