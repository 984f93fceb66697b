use crate::StoredEvent;

/// A message ready for a broker: the result of routing one [`StoredEvent`].
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The topic, rendered from the [`TopicTemplate`] with the event's aggregate type.
    pub topic: String,
    /// The event's `aggregateid`, so one aggregate's events share a partition.
    pub key: Vec<u8>,
    /// The payload as stored; `None` for a row with a NULL payload (a tombstone).
    pub value: Option<Vec<u8>>,
    /// `id`, `type`, `aggregatetype` (and the retried-dead-letter marker), then the
    /// row's `headers` column entries, in that order.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// The topic name pattern. `{aggregatetype}` is replaced by the event's aggregate type.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicTemplate(String);

/// A topic template [`TopicTemplate::parse`] refuses.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TopicTemplateError {
    /// The template is the empty string.
    #[error("the topic template is empty; use something like \"outbox.event.{{aggregatetype}}\"")]
    Empty,
    /// A `{...}` other than `{aggregatetype}` (or an unclosed `{`): the template, then
    /// the offending placeholder.
    #[error("the topic template {0:?} has an unknown placeholder {1:?}; the only placeholder is {{aggregatetype}}")]
    UnknownPlaceholder(String, String),
}

impl TopicTemplate {
    /// Debezium's default: `outbox.event.<aggregatetype>`.
    pub const DEFAULT: &'static str = "outbox.event.{aggregatetype}";

    /// Checks that `template` is not empty and uses no placeholder but
    /// `{aggregatetype}`. Whether the rendered names are legal topics is only known per
    /// event, when routing.
    pub fn parse(template: &str) -> Result<Self, TopicTemplateError> {
        if template.is_empty() {
            return Err(TopicTemplateError::Empty);
        }
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            let end = rest[start..].find('}').map(|e| start + e + 1);
            let placeholder = &rest[start..end.unwrap_or(rest.len())];
            if placeholder != "{aggregatetype}" {
                return Err(TopicTemplateError::UnknownPlaceholder(
                    template.into(),
                    placeholder.into(),
                ));
            }
            rest = &rest[start + placeholder.len()..];
        }
        Ok(TopicTemplate(template.into()))
    }

    /// The topic name for events of `aggregate_type`, not checked against Kafka's rules
    /// (see [`Router::topic_for`]).
    pub fn render(&self, aggregate_type: &str) -> String {
        self.0.replace("{aggregatetype}", aggregate_type)
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TopicTemplate {
    fn default() -> Self {
        TopicTemplate(Self::DEFAULT.into())
    }
}

/// The headers the relay sets from the row's own columns. A `headers` column entry of
/// the same name never replaces them: it is left out of the message.
pub const RESERVED_HEADERS: [&str; 4] = ["id", "type", "aggregatetype", RETRIED_DEAD_LETTER_HEADER];

/// Set (to `true`) on the message of an event that was dead-lettered and then queued
/// again with `outbox dead-letters retry`: it reaches the topic after later events of
/// its aggregate, which a consumer that applies events in order may want to know.
pub const RETRIED_DEAD_LETTER_HEADER: &str = "outbox.retried-dead-letter";

/// Why an event cannot be routed. Such an event can never be published as it is, so
/// the relay dead-letters it at once instead of retrying.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    /// The source could not read the row (see [`StoredEvent::unreadable`]); the value is
    /// why. Fix the row, then retry the dead letter.
    #[error("the row cannot be published as it is: {0}; fix the row, then run `outbox dead-letters retry`")]
    Unreadable(String),
    /// The template rendered with the event's aggregate type is not a destination the
    /// sink's broker accepts (a Kafka topic name, a NATS subject...): fix the event's
    /// `aggregatetype` or the template.
    #[error("{destination:?} (from aggregatetype {aggregate_type:?}) {why}")]
    InvalidDestination {
        /// The rendered destination (topic, subject, routing key, URL).
        destination: String,
        /// The event's `aggregatetype`.
        aggregate_type: String,
        /// The rule the name breaks, as the sink words it ("is not a legal Kafka topic
        /// name: ...").
        why: String,
    },
}

/// A sink's rule for the destinations its broker accepts: `Err` says why `destination`
/// can never be published to, starting with "is not ..." (see
/// [`RouteError::InvalidDestination`]). Each sink crate exports its own.
pub type DestinationRule = fn(destination: &str) -> Result<(), String>;

/// The rule that accepts every destination.
fn any_destination(_: &str) -> Result<(), String> {
    Ok(())
}

/// Applies DESIGN.md's routing: destination (topic, subject...) from the template, key =
/// `aggregateid`, value = payload bytes as stored, headers `id`, `type`,
/// `aggregatetype` and then every entry of the `headers` column.
#[derive(Debug, Clone)]
pub struct Router {
    template: TopicTemplate,
    rule: DestinationRule,
}

impl Default for Router {
    fn default() -> Self {
        Router::new(TopicTemplate::default())
    }
}

impl Router {
    /// A router that names destinations with `template` and checks none of them.
    pub fn new(template: TopicTemplate) -> Self {
        Router {
            template,
            rule: any_destination,
        }
    }

    /// The same router, refusing the destinations `rule` refuses (the sink's own rule,
    /// such as Kafka's for topic names).
    pub fn with_rule(self, rule: DestinationRule) -> Self {
        Router { rule, ..self }
    }

    /// The destination events of `aggregate_type` go to, or
    /// [`RouteError::InvalidDestination`] when the sink's rule refuses it.
    pub fn topic_for(&self, aggregate_type: &str) -> Result<String, RouteError> {
        let destination = self.template.render(aggregate_type);
        if let Err(why) = (self.rule)(&destination) {
            return Err(RouteError::InvalidDestination {
                destination,
                aggregate_type: aggregate_type.into(),
                why,
            });
        }
        Ok(destination)
    }

    /// The message for `event`. An error means the event can never be published as it
    /// is: dead-letter it rather than retry.
    pub fn route(&self, event: &StoredEvent) -> Result<Message, RouteError> {
        if let Some(reason) = &event.unreadable {
            return Err(RouteError::Unreadable(reason.clone()));
        }
        let topic = self.topic_for(&event.aggregate_type)?;
        let mut headers = Vec::with_capacity(3 + event.headers.len());
        headers.push(("id".to_string(), event.id.to_string().into_bytes()));
        headers.push(("type".to_string(), event.event_type.clone().into_bytes()));
        headers.push((
            "aggregatetype".to_string(),
            event.aggregate_type.clone().into_bytes(),
        ));
        if event.retried_dead_letter {
            headers.push((RETRIED_DEAD_LETTER_HEADER.to_string(), b"true".to_vec()));
        }
        for (name, value) in &event.headers {
            // The first three are always the row's own (consumers dedup on `id`).
            if !RESERVED_HEADERS.contains(&name.as_str()) {
                headers.push((name.clone(), value.clone().into_bytes()));
            }
        }
        Ok(Message {
            topic,
            key: event.aggregate_id.clone().into_bytes(),
            value: event.payload.clone(),
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn stored(aggregate_type: &str) -> StoredEvent {
        StoredEvent {
            seq: 1,
            id: Uuid::nil(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: "42".into(),
            event_type: "OrderCreated".into(),
            payload: Some(br#"{"total":12}"#.to_vec()),
            headers: vec![("traceparent".into(), "00-1-2-01".into())],
            attempts: 0,
            unreadable: None,
            retried_dead_letter: false,
        }
    }

    #[test]
    fn default_routing_matches_debezium() {
        let message = Router::default().route(&stored("order")).unwrap();
        assert_eq!(message.topic, "outbox.event.order");
        assert_eq!(message.key, b"42");
        assert_eq!(message.value.as_deref(), Some(&br#"{"total":12}"#[..]));
        let names: Vec<_> = message.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["id", "type", "aggregatetype", "traceparent"]);
        assert_eq!(message.headers[0].1, Uuid::nil().to_string().into_bytes());
        assert_eq!(message.headers[1].1, b"OrderCreated");
    }

    #[test]
    fn header_column_never_replaces_the_rows_own_headers() {
        let mut event = stored("order");
        event.headers = vec![
            ("id".into(), "forged".into()),
            ("type".into(), "Forged".into()),
            ("aggregatetype".into(), "user".into()),
            ("traceparent".into(), "t".into()),
        ];
        let message = Router::default().route(&event).unwrap();
        let names: Vec<_> = message.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["id", "type", "aggregatetype", "traceparent"]);
        assert_eq!(message.headers[0].1, Uuid::nil().to_string().into_bytes());
        assert_eq!(message.headers[2].1, b"order");
    }

    #[test]
    fn a_retried_dead_letter_says_so() {
        let mut event = stored("order");
        event.retried_dead_letter = true;
        event
            .headers
            .push((RETRIED_DEAD_LETTER_HEADER.into(), "forged".into()));
        let message = Router::default().route(&event).unwrap();
        let values: Vec<_> = message
            .headers
            .iter()
            .filter(|(n, _)| n == RETRIED_DEAD_LETTER_HEADER)
            .map(|(_, v)| v.as_slice())
            .collect();
        assert_eq!(values, [b"true"]);
    }

    #[test]
    fn an_unreadable_row_is_a_route_error() {
        let mut event = stored("order");
        event.unreadable = Some("headers are not JSON".into());
        let err = Router::default().route(&event).unwrap_err();
        assert!(err.to_string().contains("headers are not JSON"), "{err}");
    }

    #[test]
    fn template_overrides_topic() {
        let router = Router::new(TopicTemplate::parse("{aggregatetype}.events").unwrap());
        assert_eq!(router.route(&stored("user")).unwrap().topic, "user.events");
    }

    #[test]
    fn unknown_placeholder_is_rejected() {
        let err = TopicTemplate::parse("x.{aggregateid}").unwrap_err();
        assert!(err.to_string().contains("{aggregateid}"), "{err}");
        assert!(TopicTemplate::parse("").is_err());
        assert!(TopicTemplate::parse("plain").is_ok());
    }

    #[test]
    fn the_sinks_rule_refuses_destinations() {
        fn no_spaces(destination: &str) -> Result<(), String> {
            match destination.contains(' ') {
                true => Err("is not a name without spaces".into()),
                false => Ok(()),
            }
        }
        let router = Router::default().with_rule(no_spaces);
        let err = router.route(&stored("my order")).unwrap_err();
        assert!(matches!(err, RouteError::InvalidDestination { .. }));
        assert_eq!(
            err.to_string(),
            "\"outbox.event.my order\" (from aggregatetype \"my order\") is not a name without spaces"
        );
        assert!(router.route(&stored("order")).is_ok());
        assert!(Router::default().route(&stored("my order")).is_ok());
    }
}
