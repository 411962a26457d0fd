"""A signal on its way: the queue and its writer and poster threads, the durable outbox,
the log of what was sent, the delivery process for short runs, and the HTTP transport."""
