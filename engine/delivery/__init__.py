"""Delivery: the channel protocol, message templates, and dispatch of the outbox through the channels."""
