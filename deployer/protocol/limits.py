"""AWS limits and protocol bounds, named once so every check quotes the same number."""

from __future__ import annotations

#: SQS long-poll maximum. https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html
MAX_WAIT_TIME_SECONDS = 20

#: SQS ReceiveMessage batch maximum (same quota page).
MAX_RECEIVE_BATCH = 10

#: SQS redrive policy: maxReceiveCount is 1..1000.
#: https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-dead-letter-queues.html
MAX_REDRIVE_RECEIVE_COUNT = 1000

#: SQS visibility timeout maximum: 12 hours (same quota page).
MAX_VISIBILITY_TIMEOUT_SECONDS = 12 * 60 * 60

#: SNS message size maximum, 256 KiB. https://docs.aws.amazon.com/general/latest/gr/sns.html
MAX_SNS_MESSAGE_BYTES = 256 * 1024

#: SQS queue names: at most 80 alphanumerics, hyphens and underscores.
#: https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-queues.html
MAX_QUEUE_NAME_LENGTH = 80

#: Our own bound on a deploy message; real ones are ~400 bytes, so anything near this is hostile.
MAX_DEPLOY_MESSAGE_BYTES = 16 * 1024

#: Bound on a manifest document; stretcher manifests are a few hundred bytes.
MAX_MANIFEST_BYTES = 256 * 1024

#: Largest manifest a deploy document carries inline (its `manifest` key), in UTF-8 bytes; a larger
#: one is fetched from S3 as before. Every copy of the document must stay under
#: MAX_DEPLOY_MESSAGE_BYTES, the bound agents parse with (also signed: base64 adds a third, and
#: signatures, `origin` and a rollout plan share the rest). A manifest `deployer publish` writes is
#: 300-600 bytes, one with a dozen hooks and an env block about 2 KiB; JSON escaping adds ~10 % to
#: YAML text, so 4 KiB inline is at most ~6 KiB in an envelope. The publisher still measures the
#: whole document and leaves the manifest out when it would not fit.
MAX_INLINE_MANIFEST_BYTES = 4 * 1024

#: SQS message size maximum, 1 MiB since 2025, counting the body AND every message attribute
#: (name, type and value). https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html
MAX_SQS_MESSAGE_BYTES = 1024 * 1024

#: After DeleteQueue, a queue of the same name can be created again only after 60 s
#: (`QueueDeletedRecently`). https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_DeleteQueue.html
QUEUE_RECREATE_DELAY_SECONDS = 60

#: SNS subscription filter policies: 200 per topic and 10,000 per account by default; past them
#: a Subscribe that carries a FilterPolicy fails with `FilterPolicyLimitExceeded` (HTTP 403).
#: The deployer attaches none (docs/design.md, "Scale"), so it never meets this quota.
#: https://docs.aws.amazon.com/sns/latest/dg/subscription-filter-policy-constraints.html
SNS_FILTER_POLICIES_PER_TOPIC = 200
SNS_FILTER_POLICIES_PER_ACCOUNT = 10_000

#: SNS subscriptions per standard topic. https://docs.aws.amazon.com/general/latest/gr/sns.html
SNS_SUBSCRIPTIONS_PER_TOPIC = 12_500_000

#: SNS throttles Subscribe at 100 transactions per second per account.
#: https://docs.aws.amazon.com/sns/latest/api/API_Subscribe.html
SNS_SUBSCRIBE_TPS = 100

#: S3 request rates per partitioned prefix: 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD per
#: second; above them S3 answers 503 SlowDown. https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html
S3_WRITES_PER_PREFIX_PER_SECOND = 3500
S3_READS_PER_PREFIX_PER_SECOND = 5500

#: ListObjectsV2 returns at most 1,000 keys per page. https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListObjectsV2.html
S3_LIST_PAGE_KEYS = 1000

#: ELB's API allows 40 Describe* calls at once per account and region, refilled at 10 per second
#: (ThrottlingException past that): an agent asks for its targets' health at most every this
#: many seconds, so a wave of 50 instances waiting together stays at the refill rate.
#: https://docs.aws.amazon.com/elasticloadbalancing/latest/userguide/elb-api-throttling.html
DEFAULT_TRAFFIC_POLL_SECONDS = 5.0

#: How long ELB may take to show a deregistered target `draining` (no new requests from then on)
#: before the agent gives up on the deploy as `traffic_drain_timeout`. Our bound, not AWS's.
DEFAULT_DRAIN_TIMEOUT_SECONDS = 60.0
