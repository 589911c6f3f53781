"""Column orders shared by the service and its client (no heavy imports: the client loads it)."""

#: ``GET /runs?format=csv`` and :meth:`service.client.Client.runs`, in this order.
RUN_COLUMNS = (
    "id",
    "name",
    "status",
    "dataset",
    "prior",
    "prior_mode",
    "widths",
    "epochs",
    "optimizer",
    "lr",
    "created_at",
    "finished_at",
    "host",
    "train_host",
    "tags",
    "error",
    "diverged_step",
    "diverged_epoch",
    "diverged_layer",
)
