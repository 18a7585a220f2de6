"""A DNS server for the own-marks test, run in the server namespace: each A query is answered
with the next address of a list, in turn, with TTL 0, so every lookup of a name gets another
address (AAAA and other types: an empty NOERROR). Each answer is one line on stdout.

    flip_dns.py LISTEN_ADDRESS ADDRESS...
"""

from __future__ import annotations

import socket
import sys

import dns.message
import dns.rdatatype
import dns.rrset


def main() -> None:
    listen, *addresses = sys.argv[1:]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((listen, 53))
    turn = 0
    while True:
        data, peer = s.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
            question = query.question[0]
        except Exception:  # a test peer: ignore what it cannot read
            continue
        response = dns.message.make_response(query)
        if question.rdtype == dns.rdatatype.A:
            address = addresses[turn % len(addresses)]
            turn += 1
            response.answer.append(dns.rrset.from_text(question.name, 0, "IN", "A", address))
            print(f"{question.name} {address}", flush=True)
        s.sendto(response.to_wire(), peer)


if __name__ == "__main__":
    main()
