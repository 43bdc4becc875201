"""Ray actors, torch.distributed process groups and the batch driver."""
