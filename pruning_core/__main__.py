from pruning_core.cli import entry

entry()
