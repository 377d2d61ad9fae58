"""Hybrid-parallel DLRM on torch.distributed: sharding plan, hybrid step, collectives, scaling."""
