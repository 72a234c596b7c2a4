"""The sans-IO protocol core: frames, messages per layer, and the state machines of the
handshake, the multiplexer (with its stream table) and the forward control stream.

Nothing in this package performs I/O or imports ``trio``: bytes go in, events and bytes come
out, so every rule of the protocol can be tested synchronously and reused over any transport.
"""
