"""Stage 3, ablate: the plan (schema and validation), the architecture role table, the edit math and MXFP4, which
tensors get edited (tensor_edits), and the streaming job over safetensors shards (job, with safetensors_io,
shard_writer, preflight, resume, model_folder and the output record)."""
