from metric_search.cli import entry

entry()
