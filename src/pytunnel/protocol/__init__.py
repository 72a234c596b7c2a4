"""The sans-IO protocol core: frames, messages, handshake and multiplexer state.

Nothing in this package performs I/O or imports ``trio``: bytes go in, events and bytes come
out, so every rule of the protocol can be tested synchronously and reused over any transport.
"""
