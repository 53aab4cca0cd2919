"""The running engine: control segment, worker, gateways, mark-price process, supervisor."""
