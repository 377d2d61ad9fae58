"""LoadGen-driven serving of DLRM inference: query sizes, dynamic batching, co-located workers."""
