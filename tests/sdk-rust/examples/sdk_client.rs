//! An application built on the AWS SDK for Rust, configured only by environment: endpoints from
//! `AWS_ENDPOINT_URL_BEDROCK_RUNTIME` / `AWS_ENDPOINT_URL_BEDROCK`, trust from `SSL_CERT_FILE`
//! (the Rust SDK does not read `AWS_CA_BUNDLE`), region and credentials from the usual
//! variables. It runs Converse, ConverseStream and ListFoundationModels on the model named by
//! its first argument and prints one `name<TAB>value` line per result for the test to read.

use aws_config::BehaviorVersion;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ContentBlockDelta, ConversationRole, ConverseOutput, ConverseStreamOutput,
    Message,
};
use std::error::Error;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

fn user_message(text: &str) -> Result<Message> {
    Ok(Message::builder()
        .role(ConversationRole::User)
        .content(ContentBlock::Text(text.to_owned()))
        .build()?)
}

async fn converse(client: &aws_sdk_bedrockruntime::Client, model: &str) -> Result<String> {
    let out = client
        .converse()
        .model_id(model)
        .messages(user_message("hello from rust")?)
        .send()
        .await?;
    let Some(ConverseOutput::Message(message)) = out.output() else {
        return Ok(String::new());
    };
    Ok(message
        .content()
        .iter()
        .filter_map(|block| block.as_text().ok())
        .map(String::as_str)
        .collect())
}

async fn converse_stream(client: &aws_sdk_bedrockruntime::Client, model: &str) -> Result<String> {
    let mut out = client
        .converse_stream()
        .model_id(model)
        .messages(user_message("streamed from rust")?)
        .send()
        .await?;
    let mut text = String::new();
    let mut stopped = false;
    while let Some(event) = out.stream.recv().await? {
        match event {
            ConverseStreamOutput::ContentBlockDelta(delta) => {
                if let Some(ContentBlockDelta::Text(t)) = delta.delta() {
                    text.push_str(t);
                }
            }
            ConverseStreamOutput::MessageStop(_) => stopped = true,
            _ => {}
        }
    }
    if !stopped {
        return Err("the stream ended without messageStop".into());
    }
    Ok(text)
}

async fn list_models(client: &aws_sdk_bedrock::Client) -> Result<Vec<String>> {
    let out = client.list_foundation_models().send().await?;
    Ok(out
        .model_summaries()
        .iter()
        .map(|m| m.model_id().to_owned())
        .collect())
}

async fn run(model: &str) -> Result<()> {
    let config = aws_config::load_defaults(BehaviorVersion::latest()).await;
    let runtime = aws_sdk_bedrockruntime::Client::new(&config);
    let control = aws_sdk_bedrock::Client::new(&config);
    println!("converse\t{}", converse(&runtime, model).await?);
    println!(
        "converse-stream\t{}",
        converse_stream(&runtime, model).await?
    );
    println!("models\t{}", list_models(&control).await?.join(","));
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Some(model) = std::env::args().nth(1) else {
        eprintln!("usage: sdk_client <model-id>");
        return std::process::ExitCode::from(2);
    };
    match run(&model).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The SDK's Display of a service error is only its kind; Debug carries the code and
            // message the test needs to see.
            eprintln!("error: {e:?}");
            std::process::ExitCode::FAILURE
        }
    }
}
