"""Data pipelines: GLM blank infilling (`blank_infilling`) and document sources / packing (`sources`)."""
