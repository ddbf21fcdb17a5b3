"""What a process needs around the method: the process group, exit codes, test-only faults, profiling phases."""
