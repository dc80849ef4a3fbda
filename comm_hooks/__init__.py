"""Adapters from gradq's compressors to communication engines (DDP, MPI, Horovod)."""
