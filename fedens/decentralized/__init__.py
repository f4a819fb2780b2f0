"""Decentralized (gossip) learning: communication graphs, the message mailbox and node rules."""
