"""Dynamic micro-batching: pure policy and merge/split, and the asyncio batcher that uses them."""
