"""What moves a flow at run time (I/O): routing it to an outbound and logging it (dispatch),
waiting on sockets during handshakes (netio), and relaying its bytes (relay)."""
