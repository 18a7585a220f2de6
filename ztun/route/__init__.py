"""The rule engine: flow metadata in, a routing decision out. Pure: no sockets, no clocks."""
