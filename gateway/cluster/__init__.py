"""Cluster mode: several gateway nodes serve as one, with Redis for what they tell each
other and the store as the record of truth (docs/deployment.md, docs/architecture.md).

- `leases`: which node runs each conversation's actor (one writer, cluster-wide);
- `redisbus`: a conversation's events to every node with clients of it, gaps filled
  from the store;
- `forwarding`: messages and cancels that reach another node go to the owner;
- `node`: the node itself: heartbeat, take-over of conversations of lost nodes, health.
"""
