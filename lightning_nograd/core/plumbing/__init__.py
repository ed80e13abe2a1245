"""What every check stands on: the private torch interfaces, counters, fault isolation, module paths and
allow-lists, argument checks, the call stack and the parameter index."""
