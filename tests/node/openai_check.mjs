// The `openai` npm package against the agent: a streamed chat completion and an embeddings
// call, configured only by the environment (OPENAI_BASE_URL, OPENAI_API_KEY, and the xpart
// CA through NODE_EXTRA_CA_CERTS). Prints one JSON line for tests/e2e/test_openai.py.
import OpenAI from "openai";

const [chatModel, embedModel] = process.argv.slice(2);
const client = new OpenAI({ maxRetries: 0, timeout: 30_000 });

const stream = await client.chat.completions.create({
  model: chatModel,
  messages: [{ role: "user", content: "hello from node" }],
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let contentChunks = 0;
let finishReason = null;
let usage = null;
for await (const chunk of stream) {
  const choice = chunk.choices[0];
  if (choice?.delta?.content) {
    text += choice.delta.content;
    contentChunks += 1;
  }
  if (choice?.finish_reason) finishReason = choice.finish_reason;
  if (chunk.usage) usage = chunk.usage;
}

const embeddings = await client.embeddings.create({ model: embedModel, input: ["one", "two"], dimensions: 256 });
const norms = embeddings.data.map((d) => Math.sqrt(d.embedding.reduce((sum, x) => sum + x * x, 0)));

console.log(JSON.stringify({
  text,
  contentChunks,
  finishReason,
  usage,
  embeddings: embeddings.data.map((d) => ({ index: d.index, length: d.embedding.length })),
  norms,
  embeddingUsage: embeddings.usage,
}));
