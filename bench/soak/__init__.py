"""``shoal bench soak``: a long, self-checking run of the whole stack on
loopback — live migrations in every direction, SIGKILLed instances and drain
cycles through the autoscaler, with every streamed output compared to its
unmigrated reference and every instance checked for leaks at the end. See
docs/RELIABILITY.md.

The package is split so the judging can be tested without processes:
``accounting`` (records, tallies, verdict, table: pure), ``sse`` (the
client-side stream reader: pure), ``plan`` (the random choices of the
drivers: pure), ``cluster`` (child processes), ``drive`` (the phases),
``run`` (the whole soak and its outputs), ``cli`` (arguments only; imported
at ``shoal`` start-up, so it imports nothing heavy).
"""
