"""The `finetune` command: the composition root of the operator, the trainer and the cluster.

Local mode (validate, run, render, example, demo), the pod entry point (`train`, which the
operator's pods run), and the cluster side (submit, status, logs, wait) on the `kubernetes`
client. Each command imports only what it needs, so `validate` stays free of torch and of the
client, and `train` works in the trainer image, which has no Kubernetes client at all.
"""
